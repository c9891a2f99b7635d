"""Download a ModelScope model with ModelScope's own snapshot_download.

snapshot_download resumes interrupted downloads and shows a progress bar per file. Before it runs,
one quick connection test tells an offline machine so at once instead of hanging in retries.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

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
    """Copies of the weights the bundle does not load, when the Hugging Face safetensors are there:
    - .bin next to .safetensors (ZhipuAI/chatglm3-6b: 12.5 GB instead of 25 GB);
    - Meta's own checkpoint in original/ (LLM-Research/Meta-Llama-3.1-8B-Instruct: original/consolidated.00.pth,
      16 GB);
    - Mistral's consolidated.safetensors next to the sharded copy (Mistral-7B-Instruct-v0.3, Ministral-8B)."""
    patterns = []
    hf_safetensors = [f for f in files if f.endswith(".safetensors") and "/" not in f
                      and not f.startswith("consolidated")]
    if hf_safetensors:
        patterns += ["*.bin", "*.bin.index.json"]
        if any(f.startswith("original/") for f in files):
            patterns.append("original/*")
        if any(f.startswith("consolidated") for f in files):
            patterns.append("consolidated*")
    return patterns


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
