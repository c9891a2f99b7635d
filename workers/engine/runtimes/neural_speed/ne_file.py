"""neural-speed's model file (its ggjt-style "NE" format): the tensor records, and rewriting some of them.

neural-speed 1.0's quantizer writes every graph's input embedding table in GGML Q4_0 (4.5 bits per
weight: its get_rows reads GGML types, not its own packed INT8), whatever weight dtype was asked for.
That alone costs measurable quality (perplexity and top-1 agreement with fp32: docs/benchmarks.md).
So the bundle rewrites those
tables in GGML Q8_0 (8.5 bits per weight, the same INT8 precision as the rest; the graph reads it
through the same get_rows, as its gemma graph does), quantized by the gguf library from the fp32 file.

Layout, as neural-speed's writer and loader (model_files.h) have it: a 128-byte header (magic,
version, hyper-parameters, special token ids), the vocabulary (n_vocab x (length, bytes, score)),
then per tensor: n_dims, name length, type (int32s), dims, name, padding to 32 bytes, data. GGML
types have a size from their shape; neural-speed's own packed type starts with its byte size.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import quantize

HEADER_BYTES = 128
# neural-speed's file keeps ggml's type numbers (gguf's enum); its loader reads these, and any other
# type is its own packed one
F32, F16, Q4_0, Q8_0 = T.F32.value, T.F16.value, T.Q4_0.value, T.Q8_0.value
GGML_TYPES = {t.value for t in (T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)}
ROWS_PER_CHUNK = 4096  # rows of a table quantized at once: memory stays near a few MB per chunk


class UnexpectedLayout(ValueError):
    """The file is not laid out as neural-speed 1.0 writes it."""


@dataclass(frozen=True)
class Record:
    name: str
    type: int
    dims: tuple[int, ...]   # ggml order: row length first
    header: int             # file offset of the record
    data: int               # file offset of its data
    size: int               # bytes of data


def _ggml_size(kind: int, dims: tuple[int, ...]) -> int:
    block, nbytes = GGML_QUANT_SIZES[T(kind)]
    return math.prod(dims) // block * nbytes


def records(path: Path) -> list[Record]:
    """Every tensor record of the file, in file order."""
    out = []
    with open(path, "rb") as f:
        end = f.seek(0, 2)
        f.seek(8)
        (n_vocab,) = struct.unpack("i", f.read(4))
        f.seek(HEADER_BYTES)
        for _ in range(n_vocab):
            (length,) = struct.unpack("i", f.read(4))
            f.seek(length + 4, 1)
        while f.tell() < end:
            header = f.tell()
            n_dims, name_len, kind = struct.unpack("iii", f.read(12))
            if not 1 <= n_dims <= 2 or not 0 < name_len < 512:
                raise UnexpectedLayout(f"{path.name}: no tensor record at byte {header}")
            dims = struct.unpack(f"{n_dims}i", f.read(4 * n_dims))
            name = f.read(name_len).decode()
            data = (f.tell() + 31) & -32
            if kind in GGML_TYPES:
                size = _ggml_size(kind, dims)
            else:
                f.seek(data)
                (size,) = struct.unpack("Q", f.read(8))
            out.append(Record(name, kind, dims, header, data, size))
            f.seek(data + size)
        if f.tell() != end:
            raise UnexpectedLayout(f"{path.name}: the last tensor record runs past the end of the file")
    return out


def q8_0_table(f32_file: Path, record: Record) -> bytes:
    """The fp32 tensor of `record` (a record of the fp32 file) as GGML Q8_0, by the gguf library."""
    if record.type != F32:
        raise UnexpectedLayout(f"{record.name} is not fp32 in {f32_file.name}")
    rows, row = math.prod(record.dims[1:]), record.dims[0]
    table = np.memmap(f32_file, dtype=np.float32, mode="r", offset=record.data, shape=(rows, row))
    chunks = [quantize(np.asarray(table[i:i + ROWS_PER_CHUNK]), T.Q8_0).tobytes()
              for i in range(0, table.shape[0], ROWS_PER_CHUNK)]
    return b"".join(chunks)


def replace_tensors(path: Path, new: dict[str, tuple[int, bytes]]) -> None:
    """Rewrite `path` with the tensors named in `new` as (type, data); every other byte is kept."""
    if not new:
        return
    recs = records(path)
    missing = set(new) - {r.name for r in recs}
    if missing:
        raise UnexpectedLayout(f"{path.name} has no tensor {sorted(missing)}")
    tmp = path.with_name(path.name + ".rewrite")
    try:
        with open(path, "rb", buffering=0) as src, open(tmp, "wb") as dst:
            _copy(src, dst, 0, recs[0].header)
            for r in recs:
                kind, data = new.get(r.name, (r.type, None))
                name = r.name.encode()
                head = struct.pack(f"iii{len(r.dims)}i", len(r.dims), len(name), kind, *r.dims) + name
                dst.write(head + b"\0" * (-(dst.tell() + len(head)) & 31))
                if data is None:
                    _copy(src, dst, r.data, r.size)
                else:
                    dst.write(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _copy(src, dst, offset: int, n: int) -> None:
    """n bytes of src from `offset` to dst's position, inside the kernel."""
    dst.flush()
    while n > 0:
        done = os.sendfile(dst.fileno(), src.fileno(), offset, n)
        if done == 0:
            raise UnexpectedLayout(f"{src.name} ends inside a tensor")
        offset, n = offset + done, n - done
    dst.seek(0, 2)  # the buffered writer's position follows the copied bytes


def q4_0_tables_as_q8_0(f32_file: Path, int8_file: Path, also: tuple[str, ...] = ()) -> dict[str, tuple[int, bytes]]:
    """The tables neural-speed's quantizer left in GGML Q4_0 in `int8_file`, and the tensors named in `also`, as
    Q8_0 from the fp32 file."""
    sources = {r.name: r for r in records(f32_file)}
    return {r.name: (Q8_0, q8_0_table(f32_file, sources[r.name])) for r in records(int8_file)
            if r.type == Q4_0 or r.name in also}
