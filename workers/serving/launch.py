"""What every serving process does first: read its settings from the deployment snapshot.

A program of the bundle is launched as `python -m workers.serving.<program> --deployment
var/run/deployment.json [--model NAME]`; all its settings come from that validated snapshot, so no
setting has a second default in a command-line flag.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from workers.config import deployment, hosts
from workers.config.paths import logs_dir
from workers.config.schema import Deployment, ModelSpec


def parser(description: str, with_model: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--deployment", type=Path, default=None, help="deployment snapshot (default: var/run/deployment.json)")
    if with_model:
        p.add_argument("--model", required=True, help="the model's first name in the deployment")
    return p


def settings(args) -> tuple[Deployment, ModelSpec | None]:
    """Set up logging and FastChat's log folder, then return (deployment, this model's spec)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    # FastChat writes a log file per module into $LOGDIR (default: the current directory) as soon
    # as its server modules are imported, so this runs before any of them is.
    os.environ.setdefault("LOGDIR", str(logs_dir()))
    Path(os.environ["LOGDIR"]).mkdir(parents=True, exist_ok=True)
    _, dep = deployment.read_snapshot(args.deployment)
    spec = deployment.model_by_name(dep, args.model) if getattr(args, "model", None) else None
    return dep, spec


def bind_address(dep: Deployment, component) -> str:
    """The address a program listens on: its `host:` without hosts:, else its host's address or `bind:`."""
    return hosts.bind_address(dep, component)


def worker_url(dep: Deployment, spec: ModelSpec) -> str:
    """The URL a worker registers under, which the controller, API and web UI call."""
    return hosts.worker_url(dep, spec)


def controller_url(dep: Deployment) -> str:
    """Where the other programs reach the controller (its host's address with hosts:)."""
    return hosts.controller_url(dep)


# On a stop, answers still streaming get this long to end; then they are cut and the program exits (supervisord's
# stopwaitsecs, longer, is for a program that still does not: it is killed).
GRACEFUL_SHUTDOWN_S = 5


def serve(app, host: str, port: int, log_level: str = "info") -> None:
    """uvicorn.run, and the process then ends as a Python program ends. uvicorn, once shut down, raises the SIGTERM it
    caught again, and that signal's default action ends the process without Python's exit handlers: the temporary
    folder torch makes when transformers or ITREX imports torch.distributed stays in /tmp at every stop, and
    logging's last lines may be lost. The handler set here, which uvicorn restores before raising it, exits instead."""
    import gc

    import uvicorn

    # Everything imported or loaded so far lives as long as the program: out of the collector's sight, a full
    # collection does not walk it while answers stream, nor does the interpreter's last one at exit, which took
    # seconds on a busy machine (docs/operating.md, "supervisord").
    gc.freeze()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
