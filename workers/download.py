"""Download a profile's ModelScope models with ModelScope's own snapshot_download, then check them.

    python -m workers.download --profile seed [--cache-dir DIR]

snapshot_download resumes interrupted downloads and shows a progress bar per file. Before it runs,
one quick connection test tells an offline machine so at once instead of hanging in retries.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from workers import deployment, model_check
from workers.model_sources import model_dir

MODELSCOPE_HOST = os.environ.get("BUNDLE_MODELSCOPE_HOST", "www.modelscope.cn")
CONNECT_TIMEOUT_S = 5.0


class DownloadError(RuntimeError):
    pass


def check_reachable(host: str = MODELSCOPE_HOST, port: int = 443, timeout: float = CONNECT_TIMEOUT_S) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        raise DownloadError(
            f"cannot reach ModelScope ({host}:{port}): {exc.strerror or exc}. "
            f"Without network, copy each model folder to the path shown below on another machine and "
            f"run again, or point the model's source to it with `path:`."
        ) from None


def skip_patterns(files: list[str]) -> list[str]:
    """Repositories like ZhipuAI/chatglm3-6b carry the weights twice (.bin and .safetensors):
    fetch only the safetensors copy (12.5 GB instead of 25 GB)."""
    if any(f.endswith(".safetensors") for f in files):
        return ["*.bin", "*.bin.index.json"]
    return []


def download(model_id: str, revision: str, target: Path, cache_dir: Path | None) -> Path:
    from modelscope.hub.api import HubApi
    from modelscope.hub.snapshot_download import snapshot_download

    files = [f["Path"] for f in HubApi().get_model_files(model_id, revision=revision, recursive=True)]
    ignore = skip_patterns(files)
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {model_id} ({revision}) into {target}" + (f", skipping {ignore}" if ignore else ""), flush=True)
    snapshot_download(model_id, revision=revision, cache_dir=str(cache_dir) if cache_dir else None,
                      local_dir=str(target), ignore_patterns=ignore or None)
    return target


def ensure_profile_models(dep: deployment.Deployment, cache_dir: Path | None = None) -> list[Path]:
    """Download what is missing or incomplete; return the checked folders."""
    todo = [m for m in dep.models if m.source.modelscope and model_check.problems(model_dir(m.source))]
    if todo:
        check_reachable()
    for m in todo:
        download(m.source.modelscope, m.source.revision, model_dir(m.source), cache_dir)
    folders = []
    for m in dep.models:
        if m.source.modelscope:
            model_check.require_complete(model_dir(m.source))
            folders.append(model_dir(m.source))
    return folders


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="seed")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="ModelScope's download cache (default: its own, ~/.cache/modelscope)")
    args = p.parse_args(argv)
    try:
        dep = deployment.load(args.profile)
        for m in dep.models:
            if m.source.modelscope:
                print(f"{m.program}: {m.source.modelscope} -> {model_dir(m.source)}")
        for folder in ensure_profile_models(dep, args.cache_dir):
            print(f"complete: {folder}")
    except (deployment.DeploymentError, DownloadError, model_check.IncompleteModel) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
