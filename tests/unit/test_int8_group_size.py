"""group_size: auto (engine/runtimes/registry.auto_group_size): group 64 where it divides every weight row, per channel
where it does not; the row widths come from real checkpoint files (safetensors and torch .bin)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from workers.config.int8 import AUTO_GROUP_SIZE, Int8Settings
from workers.engine.runtimes import registry as int8_runtime
from workers.models.memory_budget import ModelShape, weight_bytes
from workers.models.weight_shapes import StoredTensor, checkpoint_tensors, matrix_row_widths


def folder(tmp_path, widths, fmt="safetensors"):
    state = {f"layer{i}.weight": torch.zeros(8, w) for i, w in enumerate(widths)}
    state["norm.weight"] = torch.ones(7)  # 1-D: not a matrix, no groups
    if fmt == "safetensors":
        save_file(state, str(tmp_path / "model.safetensors"))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qbits-only-family"}))
    return tmp_path


def test_checkpoint_headers_give_each_tensors_dtype_shape_and_stored_size(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    for fmt, sub, dtype in (("safetensors", "a", "F32"), ("bin", "b", "float32")):
        tensors = checkpoint_tensors(folder(tmp_path / sub, [576], fmt=fmt))
        assert tensors["layer0.weight"] == StoredTensor(dtype, (8, 576), 8 * 576 * 4)
        assert tensors["norm.weight"].elements == 7


def test_row_widths_come_from_safetensors_and_torch_checkpoints(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    assert matrix_row_widths(folder(tmp_path / "a", [576, 1536])) == {576, 1536}
    assert matrix_row_widths(folder(tmp_path / "b", [4096, 13696], fmt="bin")) == {4096, 13696}
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors or pytorch_model\\*.bin"):
        matrix_row_widths(tmp_path)


def test_auto_is_group_64_where_it_divides_every_row_else_per_channel(tmp_path):
    (tmp_path / "even").mkdir(), (tmp_path / "odd").mkdir()
    even, odd = folder(tmp_path / "even", [576, 1536]), folder(tmp_path / "odd", [576, 1000])
    assert AUTO_GROUP_SIZE == 64
    assert int8_runtime.resolve(Int8Settings(runtime="qbits"), even).group_size == 64
    assert int8_runtime.resolve(Int8Settings(runtime="qbits"), odd).group_size == -1
    # an explicit group size is the user's: kept as it is
    assert int8_runtime.resolve(Int8Settings(runtime="qbits", group_size=-1), even).group_size == -1
    assert int8_runtime.resolve(Int8Settings(runtime="qbits", group_size=32), odd).group_size == 32
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text("{}")
    with pytest.raises(int8_runtime.RuntimeUnavailable, match="auto reads the model's row widths from its weights"):
        int8_runtime.resolve(Int8Settings(runtime="qbits"), tmp_path / "config-only")


def test_unresolved_auto_never_reaches_a_quantizer():
    with pytest.raises(ValueError, match="resolved per model first"):
        Int8Settings().rtn_kwargs()


def test_memory_budget_counts_auto_as_group_64_scales():
    shape = ModelShape(params=1000_000, embedding=0, output=0, kv_bytes_per_token=0)
    assert weight_bytes(shape, "itrex-int8", "auto") == weight_bytes(shape, "itrex-int8", 64)
    assert weight_bytes(shape, "itrex-int8", "auto") > weight_bytes(shape, "itrex-int8", -1)
