"""Run FastChat's OpenAI-style API server with the bundle's settings.

API keys are read here, at start, from an environment variable and/or a file outside git, and
set on FastChat's app settings directly: passing them as `--api-keys` would put them in the
process list, the supervisord config and FastChat's startup log line ("args: ...").
"""
from __future__ import annotations

import logging
import sys

from workers.config import secrets
from workers.serving import launch

log = logging.getLogger("api_server")


def main(argv: list[str] | None = None) -> int:
    args = launch.parser(__doc__).parse_args(argv)
    dep, _ = launch.settings(args)
    try:
        keys = secrets.api_keys(dep.api)
    except secrets.SecretError as exc:
        log.error("cannot start the API server: %s", exc)
        return 2

    from workers.serving import api_policy, fastchat_compat

    fastchat_compat.apply()
    import uvicorn
    from fastchat.serve import openai_api_server as fastchat_api

    api_policy.install(fastchat_api)
    controller = launch.controller_url(dep)
    fastchat_api.app_settings.controller_address = controller
    fastchat_api.app_settings.api_keys = keys or None
    log.info("API on http://%s:%d/v1, controller %s, %s", dep.api.host, dep.api.port, controller,
             f"{len(keys)} API key(s) required" if keys else "no API key required")
    uvicorn.run(fastchat_api.app, host=dep.api.host, port=dep.api.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
