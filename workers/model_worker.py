"""Launch one FastChat model worker that loads its model through the bundle's loader.

FastChat's ModelWorker, its FastAPI app and its worker protocol (register, heartbeat, generate
stream, embeddings, token count, conversation template) are used unchanged; only the function it
calls to load weights is replaced, so backends (ITREX INT8 with its cache, fp32, bf16) and CPU
threads are chosen per model.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from workers import threads

log = logging.getLogger("bundle_worker")


def parse_cores(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cpu-cores must be a comma-separated list of integers, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-path", type=Path, required=True, help="Hugging Face model folder")
    p.add_argument("--model-names", required=True, help="comma-separated names shown to clients")
    p.add_argument("--backend", choices=("itrex-int8", "fp32", "bf16"), default="itrex-int8")
    p.add_argument("--compute-dtype", choices=("fp32", "bf16", "int8"), default="fp32", help="ITREX compute dtype")
    p.add_argument("--group-size", type=int, default=-1, help="ITREX group size (-1: per output channel, the default)")
    p.add_argument("--int8-cache-dir", type=Path, default=None, help="default: var/int8-cache")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads for this worker")
    p.add_argument("--cpu-cores", type=parse_cores, default=None, help="pin to these cores, e.g. 0,1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--worker-address", default=None, help="default: http://HOST:PORT")
    p.add_argument("--controller-address", default="http://127.0.0.1:21001")
    p.add_argument("--conv-template", default=None, help="override FastChat's template choice")
    p.add_argument("--limit-worker-concurrency", type=int, default=5)
    p.add_argument("--stream-interval", type=int, default=2)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    threads.configure(args.threads, args.cpu_cores)  # before torch is imported

    import uvicorn
    from fastchat.serve import model_worker as fastchat_worker

    from workers import fastchat_compat
    from workers.int8_settings import Int8Settings
    from workers.loader import UnsupportedBackend, load_model

    fastchat_compat.apply()
    from workers import model_check

    incomplete = model_check.problems(args.model_path)
    if incomplete:
        log.error("cannot serve %s: %s", args.model_path, "; ".join(incomplete))
        return 2
    int8 = Int8Settings(compute_dtype=args.compute_dtype, group_size=args.group_size)

    def bundle_load_model(model_path, **_fastchat_options):
        loaded = load_model(
            Path(model_path), args.backend, int8=int8,
            cache_root=args.int8_cache_dir, trust_remote_code=args.trust_remote_code,
        )
        threads.apply_to_torch(args.threads)  # after loading: ITREX resets the thread count
        return loaded

    fastchat_worker.load_model = bundle_load_model
    log.info(
        "starting worker %s: backend=%s threads=%d cores=%s", args.model_names, args.backend,
        args.threads, args.cpu_cores or "all",
    )
    try:
        worker = fastchat_worker.ModelWorker(
            args.controller_address,
            args.worker_address or f"http://{args.host}:{args.port}",
            fastchat_worker.worker_id,
            str(args.model_path),
            args.model_names.split(","),
            args.limit_worker_concurrency,
            no_register=False,
            device="cpu",
            num_gpus=0,
            max_gpu_memory=None,
            conv_template=args.conv_template,
            stream_interval=args.stream_interval,
        )
    except UnsupportedBackend as exc:
        log.error("cannot load %s: %s", args.model_path, exc)
        return 2
    log.info("worker ready: %s (context length %s)", worker.model_names, worker.context_len)
    uvicorn.run(fastchat_worker.app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
