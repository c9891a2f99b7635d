"""The row widths of a model folder's weight matrices, read from the checkpoint headers (no weights loaded).

INT8 group quantization splits every row of a matrix into groups of `group_size` values, so a
group size is usable only when it divides every row width (engine/runtimes/registry picks one).
"""
from __future__ import annotations

from pathlib import Path


def _safetensors_shapes(path: Path) -> list[tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return [tuple(f.get_slice(name).get_shape()) for name in f.keys()]


def _torch_shapes(path: Path) -> list[tuple[int, ...]]:
    import torch

    # mmap: the archive's tensors are mapped, not read, so a 10 GB shard costs only its index
    state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    return [tuple(t.shape) for t in state.values() if isinstance(t, torch.Tensor)]


def matrix_row_widths(folder: Path) -> set[int]:
    """The distinct last dimensions of every 2-D weight in the folder's checkpoint (safetensors or .bin)."""
    files = sorted(folder.glob("*.safetensors"))
    read = _safetensors_shapes
    if not files:
        files, read = sorted(folder.glob("pytorch_model*.bin")), _torch_shapes
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors or pytorch_model*.bin weights")
    return {shape[-1] for f in files for shape in read(f) if len(shape) == 2}
