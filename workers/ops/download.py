"""Download a profile's ModelScope models, then check that every folder is complete.

    bundle download --profile seed [--cache-dir DIR] [--host NAME]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from workers.config import deployment, hosts
from workers.config.schema import Deployment
from workers.models import check as model_check
from workers.models import families
from workers.models.download import DownloadError, check_reachable, download
from workers.models.sources import model_dir


def ensure_profile_models(dep: Deployment, cache_dir: Path | None = None, host: str | None = None) -> list[Path]:
    """Download what is missing or incomplete (of `host`'s models only, when given); return the checked folders."""
    models = dep.models if host is None else hosts.models_on(dep, host)
    todo = [m for m in models if m.source.modelscope and model_check.problems(model_dir(m.source), m.source.modelscope)]
    if todo:
        check_reachable()
    for m in todo:
        download(m.source.modelscope, m.source.revision, model_dir(m.source), cache_dir)
    folders = []
    for m in models:
        if m.source.modelscope:
            model_check.require_complete(model_dir(m.source), m.source.modelscope)
            folders.append(model_dir(m.source))
    return folders


def describe(modelscope_id: str) -> str:
    """What the bundle knows of a ModelScope id (families.KNOWN_MODELS), or the known ids it may be a typo of."""
    import difflib

    known = families.known_model(modelscope_id)
    if known is not None:
        return f"a {known.model_type} model" + (f"; {known.notes}" if known.notes else "")
    ids = [m.modelscope for m in families.KNOWN_MODELS]
    close = difflib.get_close_matches(modelscope_id, ids, n=2, cutoff=0.8)
    return "not one of the models the bundle knows" + (f" (did you mean {' or '.join(close)}?)" if close else "")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=os.environ.get("BUNDLE_PROFILE", "seed"),
                   help="the profile whose ModelScope models to fetch (default: $BUNDLE_PROFILE, else seed)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="ModelScope's download cache (default: its own, ~/.cache/modelscope)")
    p.add_argument("--host", default=None, help="with a hosts: section, only the models placed on this host")


def run(args) -> int:
    try:
        dep = deployment.load(args.profile, host=args.host)
        host = hosts.this_host(dep, args.host) if args.host else None
        for m in dep.models if host is None else hosts.models_on(dep, host):
            if m.source.modelscope:
                print(f"{m.program}: {m.source.modelscope} -> {model_dir(m.source)} ({describe(m.source.modelscope)})")
        for folder in ensure_profile_models(dep, args.cache_dir, host):
            print(f"complete: {folder}")
    except (deployment.DeploymentError, DownloadError, model_check.IncompleteModel, hosts.HostError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
