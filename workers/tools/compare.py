"""Ask every served model the same questions and write a side-by-side report.

    python -m workers.tools.compare [--profile default] [--questions FILE ...] [--max-tokens 512] [--redo]

Models and the API address come from the deployment in conf/ (or --api/--models). Answers stream
through the OpenAI-style API at temperature 0; each result is appended to results.jsonl as soon as
it is complete, so an interrupted run resumes where it stopped (--redo asks everything again).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import threading
from pathlib import Path

from tqdm import tqdm

from workers.config import deployment, secrets
from workers.config.paths import reports_dir
from workers.tools import questions
from workers.tools.api_client import NotServed, answer_tokens, api_key, ask, base_url, openai_client, served_models
from workers.tools.checks import runner as checks

RESULTS = "results.jsonl"


def load_done(path: Path) -> dict[tuple[str, str], dict]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash is asked again
                done[(r["question_id"], r["model"])] = r
    return done


def run(api: str, key: str, models: list[str], sets: list[questions.QuestionSet], out_dir: Path,
        max_tokens: int, temperature: float, concurrency: int, redo: bool) -> list[dict]:
    client = openai_client(api, key, max_retries=1, timeout=1800)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS
    if redo and results_path.exists():
        results_path.unlink()
    done = load_done(results_path)
    todo = [(s, q, m) for s in sets for q in s.questions for m in models if (q.id, m) not in done]
    lock = threading.Lock()

    def one(task):
        qset, q, model = task
        r = ask(client, model, q.text, max_tokens, temperature)
        tokens = answer_tokens(api, key, model, r)
        gen_s = r["total_s"] - (r["ttft_s"] or 0)
        check = checks.run(q.check, r["answer"]) if q.check and not r["error"] else None
        record = {
            "set_id": qset.id, "question_id": q.id, "model": model, **r, "tokens": tokens,
            "tok_s": (tokens / gen_s) if tokens and gen_s > 0 else None,
            "check": None if check is None else {"kind": q.check.kind, "passed": check.passed, "detail": check.detail},
            "max_tokens": max_tokens, "temperature": temperature,
        }
        with lock, open(results_path, "a") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        return record

    with tqdm(total=len(todo), desc=f"compare ({len(done)} already done)", unit="answer") as bar, \
            concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool:
        for _ in pool.map(one, todo):
            bar.update()
    return list(load_done(results_path).values())


def main(argv: list[str] | None = None) -> int:
    from workers.tools import compare_report

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=os.environ.get("BUNDLE_PROFILE", "default"))
    p.add_argument("--api", default=None, help="API base URL (default: from the profile)")
    p.add_argument("--api-key", default=None, help="default: the profile's api_keys_env / api_keys_file")
    p.add_argument("--models", default=None, help="comma-separated (default: every model the API lists)")
    p.add_argument("--questions", type=Path, nargs="*", default=None, help="question files (default: conf/questions/*.yaml)")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, default=None, help="requests at once (default: one per model)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: var/reports/compare-<profile>)")
    p.add_argument("--redo", action="store_true", help="ask everything again instead of resuming")
    args = p.parse_args(argv)
    try:
        dep = deployment.load(args.profile)
        sets = questions.load(args.questions)
        api, key = args.api or base_url(dep), args.api_key or api_key(dep)
    except (deployment.DeploymentError, questions.QuestionsError, secrets.SecretError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wanted = args.models.split(",") if args.models else None
    try:
        served = served_models(api, key, wanted)
    except NotServed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    models = wanted or sorted(served)
    out = args.out or reports_dir() / f"compare-{Path(args.profile).stem}"
    results = run(api, key, models, sets, out, args.max_tokens, args.temperature,
                  args.concurrency or len(models), args.redo)
    md, html = compare_report.write(results, models, sets, out)
    print(compare_report.summary_markdown(results, models))
    print(f"\nreport: {md}\n        {html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
