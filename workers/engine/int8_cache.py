"""The quantized-weight cache: quantize once, load the saved INT8 model on every later start.

Layout: <cache root>/<model folder name>-<key>/ holding ITREX's saved model plus
`bundle_manifest.json` (the key's inputs and every file's size and sha256), written last and
published with an atomic rename. The key covers the source model's content, the quantization
settings and the library versions, so changing any of them builds a new entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

from filelock import FileLock

from workers.config import environments
from workers.config.files import publish_dir, sha256_files, write_atomic
from workers.config.int8 import Int8Settings
from workers.engine import quantize_slots
from workers.engine.runtimes import registry
from workers.engine.runtimes.base import RuntimeUnavailable
from workers.models import memory_budget
from workers.models.families import environment_for

log = logging.getLogger("int8_cache")

CACHE_FORMAT = 1
MANIFEST = "bundle_manifest.json"
_VERSIONED = ("torch", "transformers", "intel-extension-for-transformers", "neural-compressor")
_DIGEST_MEMO = ".source-digests.json"


class CacheBuildError(RuntimeError):
    """Quantization failed; the message says where to look."""


def _source_files(source: Path) -> list[Path]:
    return sorted(
        p for p in source.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(source).parts)
    )


def memoised_digests(files: list[Path], cache_root: Path, desc: str) -> dict[Path, str]:
    """sha256 of each file, memoised by (size, mtime) in the cache root.

    A 15 GB source or a 10 GB INT8 entry is read once, not on every start (and not twice per
    start, by start_all.sh and then by the worker). A changed or truncated file has a new stamp
    and is hashed again.
    """
    memo_path = cache_root / _DIGEST_MEMO
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    stamps = {f: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    stale = [f for f in files if memo.get(str(f), {}).get("stamp") != stamps[f]]
    for f, digest in sha256_files(stale, desc).items():
        memo[str(f)] = {"stamp": stamps[f], "sha256": digest}
    if stale:
        write_atomic(memo_path, json.dumps(memo))
    return {f: memo[str(f)]["sha256"] for f in files}


def source_fingerprint(source: Path, cache_root: Path) -> str:
    """sha256 over every file of the source model folder."""
    files = _source_files(source)
    total = hashlib.sha256()
    for f, digest in memoised_digests(files, cache_root, f"fingerprint {source.name}").items():
        total.update(f"{f.relative_to(source)}\0{digest}\n".encode())
    return total.hexdigest()


def key_inputs(source: Path, settings: Int8Settings, cache_root: Path) -> dict:
    """What the entry's key covers (with "auto" resolved to the runtime and group size this model gets)."""
    if "auto" in (settings.runtime, settings.group_size):
        settings = registry.resolve(settings, source)
    inputs = {
        "format": CACHE_FORMAT,
        "source": source_fingerprint(source, cache_root),
        "settings": settings.rtn_kwargs(),
        "versions": environments.versions(model_environment(source), _VERSIONED),  # where it is quantized and loaded
    }
    registry.by_name(settings.runtime).add_cache_key(inputs)
    return inputs


def model_environment(source: Path) -> environments.Environment:
    """The environment the model's worker runs in (families.environment_for): its quantizer runs there too."""
    return environment_for(json.loads((Path(source) / "config.json").read_text()))[0]


def entry_dir(source: Path, inputs: dict, cache_root: Path) -> Path:
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root / f"{source.name}-{key}"


def verify(entry: Path, inputs: dict) -> str | None:
    """None when `entry` is a complete cache for `inputs`, else why it is not."""
    manifest_path = entry / MANIFEST
    if not manifest_path.is_file():
        return f"{MANIFEST} is missing"
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as exc:
        return f"{MANIFEST} is not valid JSON ({exc})"
    if manifest.get("inputs") != inputs:
        return "it was built from other inputs (source, settings or versions)"
    files = manifest.get("files", {})
    if not files:
        return "it lists no weight files"
    for name, meta in files.items():
        path = entry / name
        if not path.is_file():
            return f"file {name} is missing"
        if path.stat().st_size != meta["size"]:
            return f"file {name} has {path.stat().st_size} bytes, expected {meta['size']}"
    digests = memoised_digests([entry / name for name in files], entry.parent, f"verify {entry.name}")
    for name, meta in files.items():
        if digests[entry / name] != meta["sha256"]:
            return f"file {name} does not match its sha256"
    return None


def _build(source: Path, entry: Path, inputs: dict, runtime, trust_remote_code: bool) -> None:
    with publish_dir(entry) as staging, tempfile.TemporaryDirectory(prefix="quantize-") as work:
        try:
            env = runtime.quantizer_environment or model_environment(source)
            if not env.is_built():
                raise CacheBuildError(f"the {runtime.name} runtime quantizes in the '{env.name}' environment, which "
                                      f"is not built: scripts/setup.sh --env {env.name}")
            cmd = runtime.quantize_command(source, staging, inputs, env.python())
        except RuntimeUnavailable as exc:
            raise CacheBuildError(str(exc)) from None
        cmd += ["--trust-remote-code"] if trust_remote_code else []
        # cwd=work: neural-compressor writes an nc_workspace/ folder into the current directory.
        proc = subprocess.run(cmd, cwd=work)  # the project is installed (editable) in each environment
        if proc.returncode != 0:
            raise CacheBuildError(f"quantizing {source} failed (exit code {proc.returncode}); see the quantize lines "
                                  f"above{runtime.quantize_failed_hint}")
        written = sorted(p for p in staging.rglob("*") if p.is_file())
        if not written:  # never publish an entry that would load nothing
            raise CacheBuildError(f"quantizing {source} wrote no files into {staging}")
        digests = sha256_files(written, "checksum INT8 files")
        files = {str(p.relative_to(staging)): {"size": p.stat().st_size, "sha256": d} for p, d in digests.items()}
        # The manifest is written last: a folder without it is never served.
        (staging / MANIFEST).write_text(json.dumps({"inputs": inputs, "files": files}, indent=2))


def ensure(source: Path, settings: Int8Settings, cache_root: Path, trust_remote_code: bool = False) -> Path:
    """Return a verified INT8 cache folder for `source`, quantizing first when there is none."""
    # Absolute: the quantizer child runs in a scratch folder, where a relative path means another place.
    source, cache_root = source.resolve(), cache_root.resolve()
    cache_root.mkdir(parents=True, exist_ok=True)
    if "auto" in (settings.runtime, settings.group_size):
        settings = registry.resolve(settings, source)
    inputs = key_inputs(source, settings, cache_root)
    entry = entry_dir(source, inputs, cache_root)
    # One builder per entry: a second worker for the same model waits, then reuses the result.
    with FileLock(str(entry) + ".lock"):
        if entry.exists():
            problem = verify(entry, inputs)
            if problem is None:
                log.info("INT8 cache hit: loading quantized weights from %s", entry)
                return entry
            log.warning("INT8 cache at %s is invalid: %s; deleting it and quantizing again", entry, problem)
            shutil.rmtree(entry)
        log.info("INT8 cache miss for %s: quantizing now (first start only)", source.name)
        with quantize_slots.admitted(cache_root, memory_budget.quantize_peak_of_folder(source), source.name):
            _build(source, entry, inputs, registry.by_name(settings.runtime), trust_remote_code)
        log.info("INT8 cache written to %s", entry)
        return entry
