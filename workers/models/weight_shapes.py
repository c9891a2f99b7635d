"""What a model folder's checkpoint holds, read from its headers (no weights loaded): every tensor's dtype, shape
and stored size, and the row widths of its weight matrices. The one reader of checkpoint headers.

INT8 group quantization splits every row of a matrix into groups of `group_size` values, so a
group size is usable only when it divides every row width (engine/runtimes/registry picks one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

# bytes per element of safetensors' dtype names (its header gives names, not sizes)
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                           "BOOL": 1}


@dataclass(frozen=True)
class StoredTensor:
    dtype: str               # as the file names it: safetensors' F32, I8, ... or torch's float32, int8, ...
    shape: tuple[int, ...]
    nbytes: int              # its size in the file

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


def _safetensors_tensors(path: Path) -> dict[str, StoredTensor]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            part = f.get_slice(name)
            shape, dtype = tuple(part.get_shape()), part.get_dtype()
            out[name] = StoredTensor(dtype, shape, math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype])
    return out


def _torch_tensors(path: Path) -> dict[str, StoredTensor]:
    import torch

    # mmap: the archive's tensors are mapped, not read, so a 10 GB shard costs only its index
    state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    return {name: StoredTensor(str(t.dtype).removeprefix("torch."), tuple(t.shape), t.numel() * t.element_size())
            for name, t in state.items() if isinstance(t, torch.Tensor)}


def checkpoint_tensors(folder: Path) -> dict[str, StoredTensor]:
    """name -> StoredTensor of every tensor in the folder's checkpoint (*.safetensors, else pytorch_model*.bin)."""
    files = sorted(folder.glob("*.safetensors"))
    read = _safetensors_tensors
    if not files:
        files, read = sorted(folder.glob("pytorch_model*.bin")), _torch_tensors
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors or pytorch_model*.bin weights")
    return {name: tensor for f in files for name, tensor in read(f).items()}


def matrix_row_widths(folder: Path) -> set[int]:
    """The distinct last dimensions of every 2-D weight in the folder's checkpoint (safetensors or .bin)."""
    return {t.shape[-1] for t in checkpoint_tensors(folder).values() if len(t.shape) == 2}
