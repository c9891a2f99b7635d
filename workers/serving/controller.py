"""Run FastChat's controller with the bundle's compatibility patches applied in its process.

    python -m workers.serving.controller --deployment var/run/deployment.json

The API server and the web UI have their own wrappers (api_server.py, web_ui.py): runpy executes
a fresh copy of a module, so patches to that module's own functions would not apply.
"""
from __future__ import annotations

import runpy
import sys

from workers.serving import launch

MODULE = "fastchat.serve.controller"


def main(argv: list[str] | None = None) -> None:
    args = launch.parser(__doc__).parse_args(argv)
    dep, _ = launch.settings(args)
    from workers.serving import fastchat_compat

    fastchat_compat.apply()
    sys.argv = [MODULE, "--host", dep.controller.host, "--port", str(dep.controller.port)]
    runpy.run_module(MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
