"""Run FastChat's controller with the bundle's compatibility patches applied in its process.

Usage: python -m workers.launch_fastchat fastchat.serve.controller --host ... --port ...

The API server and the web UI have their own wrappers (workers/api_server.py, workers/web_ui.py):
runpy executes a fresh copy of a module, so patches to that module's own functions would not apply.
"""
from __future__ import annotations

import runpy
import sys

from workers import fastchat_compat

ALLOWED = {"fastchat.serve.controller"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ALLOWED:
        sys.exit(f"usage: python -m workers.launch_fastchat {{{'|'.join(sorted(ALLOWED))}}} [args...]")
    module = sys.argv[1]
    fastchat_compat.apply()
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
