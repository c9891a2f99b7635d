"""Q4_0 weights (blocks of 32 4-bit weights with one f16 scale) from the F16 GGUF file llama.cpp's converter wrote,
by gguf-py's own Q4_0 quantizer (llama.cpp's reference rounding, in numpy): what llama.cpp's quantize tool makes of
the same file, which the prebuilt library does not export.

As in llama.cpp's Q4_0: the 1-D tensors stay as the converter wrote them (F32), and the output projection
(`output.weight`, or `token_embd.weight` when the model ties the two) is kept in 8 bits. llama.cpp gives it Q6_K
where its rows are a multiple of 256 and Q8_0 where not; gguf-py writes no Q6_K, so here it is always Q8_0.
A tensor whose rows are not a multiple of 32 stays F16.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROWS_PER_CHUNK = 4096  # rows quantized at a time: a large vocabulary's f32 copy and numpy's temporaries stay small


def requantize(f16: Path, out: Path, gguf_py: Path, progress=None) -> dict[str, int]:
    """Write `out` from the F16 GGUF file `f16`; the count of tensors written in each type."""
    sys.path.insert(0, str(gguf_py))
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    reader = gguf.GGUFReader(f16)
    names = {t.name for t in reader.tensors}
    output = "output.weight" if "output.weight" in names else "token_embd.weight"
    writer = gguf.GGUFWriter(out, arch=reader.fields[gguf.Keys.General.ARCHITECTURE].contents(),
                             endianess=reader.endianess)
    alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by the writer itself
        value = gguf.LlamaFileType.MOSTLY_Q4_0 if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)

    plan = []  # (tensor, its type here, its bytes here)
    for tensor in reader.tensors:
        qtype = tensor.tensor_type
        if qtype == Q.F16 and tensor.data.ndim >= 2 and tensor.data.shape[-1] % 32 == 0:
            qtype = Q.Q8_0 if tensor.name == output else Q.Q4_0
        if qtype == tensor.tensor_type:
            nbytes = tensor.data.nbytes
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, nbytes, qtype)
        else:
            shape = gguf.quant_shape_to_byte_shape(tensor.data.shape, qtype)
            nbytes = int(np.prod(shape))
            writer.add_tensor_info(tensor.name, shape, np.dtype(np.uint8), nbytes, qtype)
        plan.append((tensor, qtype, nbytes))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    counts: dict[str, int] = {}
    for tensor, qtype, nbytes in plan:
        data = tensor.data if qtype == tensor.tensor_type else Quantized(tensor.data, qtype, nbytes,
                                                                          gguf.quants.quantize)
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
        if progress is not None:
            progress(tensor.n_bytes)
    writer.close()
    return counts


class Quantized:
    """An F16 tensor as `qtype` bytes, quantized and written a few thousand rows at a time (GGUFWriter asks only
    its size and tofile())."""

    def __init__(self, data, qtype, nbytes: int, quantize):
        self.rows, self.qtype, self.nbytes, self.quantize = data.reshape(-1, data.shape[-1]), qtype, nbytes, quantize

    def tofile(self, fout) -> None:
        import numpy as np

        for start in range(0, len(self.rows), ROWS_PER_CHUNK):
            chunk = np.asarray(self.rows[start:start + ROWS_PER_CHUNK], dtype=np.float32)
            self.quantize(chunk, self.qtype).tofile(fout)
