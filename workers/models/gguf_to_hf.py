"""Convert a llama-architecture GGUF file into a Hugging Face folder.

The pinned transformers (4.40) predates its own GGUF loader (4.41), so tensors are read and
dequantized with the `gguf` package and the tokenizer is rebuilt with `tokenizers`.
Only what SmolLM2 needs is supported: llama architecture, byte-level BPE ("gpt2") vocabulary.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# llama.cpp's pre-tokenizer names whose regex is GPT-2's byte-level split; "smollm" additionally
# splits digits one by one (llama-vocab.cpp), exactly like SmolLM's own tokenizer.json.
_DIGIT_SPLIT_PRE = {"smollm"}
_PLAIN_GPT2_PRE = {"gpt2", "default"}


class GGUFConversionError(ValueError):
    """The GGUF file is not something this converter can turn into a correct HF model."""


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _unpermute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    convert_hf_to_gguf.py reorders each head's rows from HF's "rotate half" layout to interleaved
    pairs: reshape(n_head, 2, d/2, ...).swapaxes(1, 2). This is its inverse.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def read_config(reader: gguf.GGUFReader) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFConversionError(f"general.architecture is {arch!r}; only 'llama' is supported")
    a = f"{arch}."
    tensor_names = {t.name for t in reader.tensors}
    n_head = int(_field(reader, a + "attention.head_count"))
    return LlamaConfig(
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
        hidden_size=int(_field(reader, a + "embedding_length")),
        intermediate_size=int(_field(reader, a + "feed_forward_length")),
        num_hidden_layers=int(_field(reader, a + "block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(_field(reader, a + "attention.head_count_kv", n_head)),
        max_position_embeddings=int(_field(reader, a + "context_length")),
        rms_norm_eps=float(_field(reader, a + "attention.layer_norm_rms_epsilon")),
        # Must come from the file: SmolLM2 uses 100000, and the 10000 default silently hurts quality.
        rope_theta=float(_field(reader, a + "rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        torch_dtype="float32",
    )


def read_state_dict(reader: gguf.GGUFReader, config: LlamaConfig) -> dict[str, torch.Tensor]:
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    by_name = {t.name: t for t in reader.tensors}
    with torch.device("meta"):
        expected = LlamaForCausalLM(config).state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    state: dict[str, torch.Tensor] = {}
    for hf_name in tqdm(list(expected), desc="dequantize GGUF tensors", unit="tensor"):
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None or gguf_name not in by_name:
            raise GGUFConversionError(f"tensor {hf_name} (GGUF {gguf_name}) is missing from the file")
        tensor = by_name[gguf_name]
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if hf_name.endswith("self_attn.q_proj.weight"):
            array = _unpermute_rope(array, config.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            array = _unpermute_rope(array, config.num_key_value_heads)
        if tuple(array.shape) != tuple(expected[hf_name].shape):
            raise GGUFConversionError(
                f"tensor {hf_name}: shape {tuple(array.shape)} != expected {tuple(expected[hf_name].shape)}"
            )
        state[hf_name] = torch.from_numpy(np.ascontiguousarray(array))
    return state


def read_tokenizer(reader: gguf.GGUFReader) -> PreTrainedTokenizerFast:
    kind = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _DIGIT_SPLIT_PRE | _PLAIN_GPT2_PRE:
        raise GGUFConversionError(
            f"tokenizer.ggml.model={kind!r}, tokenizer.ggml.pre={pre!r}: only byte-level BPE "
            f"(gpt2) with pre-tokenizer {sorted(_DIGIT_SPLIT_PRE | _PLAIN_GPT2_PRE)} is supported"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    token_types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [tok for tok, t in zip(tokens, token_types) if t == gguf.TokenType.CONTROL]
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in control])

    def token(key: str) -> str | None:
        idx = _field(reader, key)
        return None if idx is None else tokens[int(idx)]

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        model_max_length=int(_field(reader, "llama.context_length", 2048)),
        clean_up_tokenization_spaces=False,
    )


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Write config, safetensors weights, tokenizer (with chat template) into out_dir."""
    reader = gguf.GGUFReader(str(gguf_path))
    config = read_config(reader)
    tokenizer = read_tokenizer(reader)
    state = read_state_dict(reader, config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise GGUFConversionError(f"no weights for {missing[:5]}")
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "gguf_source.json").write_text(
        json.dumps({"file": gguf_path.name, "general.name": _field(reader, "general.name")}, indent=2)
    )
