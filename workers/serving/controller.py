"""Run FastChat's controller with the bundle's patches applied in its process.

    python -m workers.serving.controller --deployment var/run/deployment.json

FastChat's module is imported (not run with runpy, which would execute a fresh copy that no patch
reaches) and served the way its `__main__` block does: `controller` is the module global its
endpoints use. In this process:
- the worker secret is required on every endpoint, and its status calls to workers carry it
  (workers/serving/auth.py);
- silent workers are dropped within about a second of the heartbeat expiry (FastChat checks only
  every `expiration_s`, so a vanished host's models stayed listed for up to twice that);
- it binds to its host's address (127.0.0.1 without a hosts: section).
"""
from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from types import SimpleNamespace

from workers.config import hosts
from workers.serving import launch

DISPATCH_METHOD = "shortest_queue"  # FastChat's default
EXPIRY_CHECK_S = 1.0

log = logging.getLogger("bundle_controller")


def heart_beat_controller(controller) -> None:
    while True:
        time.sleep(EXPIRY_CHECK_S)
        controller.remove_stale_workers_by_expiration()


def main(argv: list[str] | None = None) -> int:
    args = launch.parser(__doc__).parse_args(argv)
    dep, _ = launch.settings(args)
    from workers.serving import auth, fastchat_compat

    fastchat_compat.apply()
    import uvicorn
    from fastchat.serve import controller as fastchat_controller

    secret = auth.install_controller(fastchat_controller, dep)
    fastchat_controller.heart_beat_controller = heart_beat_controller  # read by Controller.__init__
    # FastChat's expiry thread is not a daemon: after a SIGTERM the process would wait for it until
    # supervisord's SIGKILL. Make it one (the module uses `threading` for nothing else).
    fastchat_controller.threading = SimpleNamespace(Thread=functools.partial(threading.Thread, daemon=True))
    fastchat_controller.controller = fastchat_controller.Controller(DISPATCH_METHOD)
    host = hosts.bind_address(dep, "controller")
    log.info("controller on http://%s:%d (%s)", host, dep.controller.port,
             "worker secret required" if secret else "no worker secret configured: internal calls are not checked")
    uvicorn.run(fastchat_controller.app, host=host, port=dep.controller.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
