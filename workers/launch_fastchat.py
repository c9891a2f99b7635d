"""Run a FastChat server module (openai_api_server, gradio web server, controller) with the
bundle's compatibility patches applied in its process.

Usage: python -m workers.launch_fastchat fastchat.serve.openai_api_server --host ... --port ...
"""
from __future__ import annotations

import runpy
import sys

from workers import fastchat_compat

ALLOWED = {
    "fastchat.serve.controller",
    "fastchat.serve.openai_api_server",
    "fastchat.serve.gradio_web_server",
    "fastchat.serve.gradio_web_server_multi",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ALLOWED:
        sys.exit(f"usage: python -m workers.launch_fastchat {{{'|'.join(sorted(ALLOWED))}}} [args...]")
    module = sys.argv[1]
    fastchat_compat.apply()
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
