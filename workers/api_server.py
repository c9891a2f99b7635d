"""Run FastChat's OpenAI-style API server with the bundle's settings.

API keys are read here, at start, from an environment variable and/or a file outside git, and
set on FastChat's app settings directly: passing them as `--api-keys` would put them in the
process list, the supervisord config and FastChat's startup log line ("args: ...").
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("api_server")


def read_api_keys(env_name: str | None, file: Path | None) -> list[str]:
    keys: list[str] = []
    if env_name and os.environ.get(env_name):
        keys += [k.strip() for k in os.environ[env_name].split(",") if k.strip()]
    if file is not None:
        if not file.is_file():
            raise SystemExit(f"api_keys_file {file} does not exist")
        keys += [line.strip() for line in file.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return keys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--controller-address", default="http://127.0.0.1:21001")
    p.add_argument("--api-keys-env", default=None, help="name of a variable holding comma-separated keys")
    p.add_argument("--api-keys-file", type=Path, default=None, help="file with one key per line")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")

    from workers import api_guards, fastchat_compat

    fastchat_compat.apply()
    import uvicorn
    from fastchat.serve import openai_api_server as fastchat_api

    api_guards.install(fastchat_api)

    keys = read_api_keys(args.api_keys_env, args.api_keys_file)
    fastchat_api.app_settings.controller_address = args.controller_address
    fastchat_api.app_settings.api_keys = keys or None
    log.info("API on http://%s:%d/v1, controller %s, %s", args.host, args.port, args.controller_address,
             f"{len(keys)} API key(s) required" if keys else "no API key required")
    uvicorn.run(fastchat_api.app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
