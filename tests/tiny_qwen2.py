"""A tiny random-weight Qwen2 folder with Qwen2.5's tokenizer and chat template: a Hermes-style tool-calling
model (`<tool_call>` JSON) that loads on the pinned transformers 4.40 (model_type qwen2).

Offline material comes from the llama-cpp-python sdist (PyPI), cached under var/cache/llama-cpp-sdist:
- vendor/llama.cpp/models/ggml-vocab-qwen2.gguf: Qwen2's byte-level BPE vocabulary and merges, with
  the .inp/.out test vectors beside it (`check_tokenizer` compares against them);
- vendor/llama.cpp/models/templates/Qwen-Qwen2.5-7B-Instruct.jinja: Qwen2.5's chat template.
Qwen2.5's tokenizer is Qwen2's with the added tokens below at the ids the GGUF leaves as padding.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "var" / "cache" / "llama-cpp-sdist"
SDIST = "llama_cpp_python-0.3.36"
MEMBERS = ("vendor/llama.cpp/models/ggml-vocab-qwen2.gguf", "vendor/llama.cpp/models/ggml-vocab-qwen2.gguf.inp",
           "vendor/llama.cpp/models/ggml-vocab-qwen2.gguf.out",
           "vendor/llama.cpp/models/templates/Qwen-Qwen2.5-7B-Instruct.jinja")
# Qwen2's pre-tokenizer split (its tokenizer.json; llama.cpp's "qwen2" pre-tokenizer).
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")
# Qwen2.5's added tokens after <|im_end|> (special: False for the tool-call tags and FIM ones).
QWEN25_ADDED = ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>"}
FIRST_ADDED = 151646
IM_END, ENDOFTEXT = 151645, 151643


def material() -> Path:
    """The sdist's needed files under CACHE (downloaded with pip and extracted once)."""
    base = CACHE / SDIST
    if all((base / m).is_file() for m in MEMBERS):
        return base
    CACHE.mkdir(parents=True, exist_ok=True)
    archive = CACHE / f"{SDIST}.tar.gz"
    if not archive.is_file():
        version = SDIST.split("-")[-1]
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                        "--no-binary", ":all:", "--no-build-isolation", "-d", str(CACHE)], check=True,
                       capture_output=True, timeout=600)
    with tarfile.open(archive) as tar:
        for m in MEMBERS:
            member = tar.getmember(f"{SDIST}/{m}")
            tar.extract(member, CACHE, filter="data")
    return base


def tokenizer():
    """Qwen2.5's tokenizer, rebuilt from the GGUF vocabulary with `tokenizers`."""
    import gguf
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = material()
    reader = gguf.GGUFReader(str(base / MEMBERS[0]))
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    for i, t in enumerate(QWEN25_ADDED):
        tokens[FIRST_ADDED + i] = t
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == 1 or i >= ENDOFTEXT}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    added = [tokens[i] for i in range(ENDOFTEXT, FIRST_ADDED)] + list(QWEN25_ADDED)
    backend.add_tokens([AddedToken(t, special=t not in NOT_SPECIAL, normalized=False) for t in added])
    template = (base / MEMBERS[3]).read_text()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=template, model_max_length=32768, clean_up_tokenization_spaces=False,
                                   errors="replace", split_special_tokens=False)


def check_tokenizer(tok) -> list[str]:
    """Differences from llama.cpp's test vectors (empty: the tokenizer encodes as Qwen2's own)."""
    base = material()
    cases = (base / MEMBERS[1]).read_text().split("\n__ggml_vocab_test__\n")
    expected = (base / MEMBERS[2]).read_text().split("\n")
    problems = []
    for text, ids in zip(cases, expected):
        want = [int(i) for i in ids.split()]
        got = tok.encode(text, add_special_tokens=False)
        if got != want:
            problems.append(f"{text!r}: {got} != {want}")
    return problems


def build(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen2 (hidden 64) with random N(0, 0.02) weights and Qwen2.5's tokenizer and template."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    config = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=ENDOFTEXT, eos_token_id=IM_END,
                         torch_dtype="float32", architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer().save_pretrained(folder)
    GenerationConfig(bos_token_id=ENDOFTEXT, eos_token_id=[IM_END, ENDOFTEXT], pad_token_id=ENDOFTEXT).save_pretrained(folder)
    (folder / "tiny_qwen2.json").write_text(json.dumps({"seed": seed, "source": SDIST}))
    return folder
