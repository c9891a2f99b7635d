"""File utilities: publish a file or a directory all at once, and checksums.

A file or folder is built under a temporary name, then renamed. A crash (or kill -9) mid-write
leaves only a temporary (a `.partial-*` folder, a `.<name>.<random>.tmp` file) that nobody reads, never a
half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

GIB = 2**30
PARTIAL_PREFIX = ".partial-"
_PROGRESS_BYTES = 256 * 2**20


def write_atomic(path: Path, text: str, mode: int = 0o600) -> Path:
    """Write `text` to `path` so readers see the old content or the new, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per call: two threads of one process writing the same file (the INT8 cache's digest memo)
    # shared a name by pid, and one renamed the other's file away.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_files(paths: list[Path], desc: str) -> dict[Path, str]:
    """sha256 of each file, with a progress bar when there is enough to read to make one wait."""
    from tqdm import tqdm

    total = sum(p.stat().st_size for p in paths)
    digests = {}
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=total < _PROGRESS_BYTES) as bar:
        for p in paths:
            digests[p] = sha256_file(p)
            bar.update(p.stat().st_size)
    return digests


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def remove_stale_partials(parent: Path, stem: str) -> None:
    for stale in parent.glob(f"{PARTIAL_PREFIX}{stem}-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def publish_dir(final: Path) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces `final` atomically, on error it is deleted."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final.parent, final.name)
    staging = final.parent / f"{PARTIAL_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
