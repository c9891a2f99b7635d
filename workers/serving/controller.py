"""Run FastChat's controller with the bundle's patches applied in its process.

    python -m workers.serving.controller --deployment var/run/deployment.json

FastChat's module is imported (not run with runpy, which would execute a fresh copy that no patch
reaches) and served the way its `__main__` block does: `controller` is the module global its
endpoints use. In this process:
- the worker secret is required on every endpoint, and its status calls to workers carry it
  (workers/serving/auth.py);
- silent workers are dropped within EXPIRY_CHECK_S of the heartbeat expiry (workers/serving/fastchat_compat.py);
- it binds to its host's address (127.0.0.1 without a hosts: section).
"""
from __future__ import annotations

import logging
import sys

from workers.config import hosts
from workers.serving import launch

EXPIRY_CHECK_S = 1.0

log = logging.getLogger("bundle_controller")


def main(argv: list[str] | None = None) -> int:
    args = launch.parser(__doc__).parse_args(argv)
    dep, _ = launch.settings(args)

    from workers.serving import auth, fastchat_compat

    secret = auth.secret(dep)
    fastchat_controller = fastchat_compat.apply_controller(auth.RequestsShim(secret, who="controller"), EXPIRY_CHECK_S)
    auth.install_server(fastchat_controller.app, secret)
    host = hosts.bind_address(dep, "controller")
    log.info("controller on http://%s:%d (%s)", host, dep.controller.port,
             "worker secret required" if secret else "no worker secret configured: internal calls are not checked")
    launch.serve(fastchat_controller.app, host, dep.controller.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
