"""Launch one FastChat model worker that loads its model through the bundle's loader.

    python -m workers.serving.worker --deployment var/run/deployment.json --model NAME

FastChat's ModelWorker, its FastAPI app and its worker protocol (register, heartbeat, generate
stream, embeddings, token count, conversation template) are used unchanged; only the function it
calls to load weights is replaced, so backends (ITREX INT8 with its cache, fp32, bf16) and CPU
threads are chosen per model. Every setting comes from the deployment snapshot.
"""
from __future__ import annotations

import logging
import sys

from workers.engine import threads
from workers.serving import launch

log = logging.getLogger("bundle_worker")
STREAM_INTERVAL = 2  # tokens between stream updates (FastChat's default)


def main(argv: list[str] | None = None) -> int:
    args = launch.parser(__doc__, with_model=True).parse_args(argv)
    dep, spec = launch.settings(args)
    threads.configure(spec.threads, spec.cpu_cores)  # before torch is imported

    from workers.models import check as model_check
    from workers.models.sources import model_dir

    folder = model_dir(spec.source)
    incomplete = model_check.problems(folder)
    if incomplete:
        log.error("cannot serve %s: %s", folder, "; ".join(incomplete))
        return 2

    from workers.serving import fastchat_compat

    fastchat_compat.apply()
    import uvicorn
    from fastchat.serve import model_worker as fastchat_worker

    from workers.engine.loader import UnsupportedBackend, load_model

    def bundle_load_model(model_path, **_fastchat_options):
        loaded = load_model(folder, spec.backend, int8=spec.int8, trust_remote_code=spec.trust_remote_code)
        threads.apply_to_torch(spec.threads)  # after loading: ITREX resets the thread count
        return loaded

    fastchat_worker.load_model = bundle_load_model
    log.info("starting worker %s: backend=%s threads=%d cores=%s", spec.names, spec.backend,
             spec.threads, spec.cpu_cores or "all")
    host = "127.0.0.1"
    try:
        worker = fastchat_worker.ModelWorker(
            launch.controller_url(dep),
            f"http://{host}:{spec.port}",
            fastchat_worker.worker_id,
            str(folder),
            spec.names,
            spec.limit_concurrency,
            no_register=False,
            device="cpu",
            num_gpus=0,
            max_gpu_memory=None,
            conv_template=spec.conv_template,
            stream_interval=STREAM_INTERVAL,
        )
    except UnsupportedBackend as exc:
        log.error("cannot load %s: %s", folder, exc)
        return 2
    log.info("worker ready: %s (context length %s)", worker.model_names, worker.context_len)
    uvicorn.run(fastchat_worker.app, host=host, port=spec.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
