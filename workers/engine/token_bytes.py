"""Each token's own bytes and text, for logprobs (OpenAI gives both: a token can be part of a character).

A token's bytes come from the tokenizer's own vocabulary piece: byte-level BPE pieces (GPT-2's byte-to-unicode
alphabet, SmolLM2, Qwen2) map back through transformers' table, SentencePiece byte-fallback pieces (<0xE4>) are
that byte, tiktoken-style tokenizers (Qwen-7B's remote code) give bytes already; anything else is what the
tokenizer decodes the id to. The text is the bytes as UTF-8, or, for part of a character, OpenAI's
"bytes:\\xe4\\xbd" spelling.
"""
from __future__ import annotations

import json
import re

from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
SENTENCEPIECE_SPACE = "\u2581"


def _byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
    return "ByteLevel" in kinds


class TokenPieces:
    """id -> (text, bytes) for one tokenizer, remembered once looked up."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_decoder = {c: b for b, c in bytes_to_unicode().items()} if _byte_level(tokenizer) else None
        self._seen: dict[int, tuple[str, bytes]] = {}

    def bytes_of(self, token: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, bytes):
            return piece
        if isinstance(piece, str):
            if self.byte_decoder is not None and all(c in self.byte_decoder for c in piece):
                return bytes(self.byte_decoder[c] for c in piece)
            match = BYTE_FALLBACK.fullmatch(piece)
            if match:
                return bytes([int(match.group(1), 16)])
            if SENTENCEPIECE_SPACE in piece:
                return piece.replace(SENTENCEPIECE_SPACE, " ").encode()
        return self.tokenizer.decode([token]).encode()

    def get(self, token: int) -> tuple[str, bytes]:
        found = self._seen.get(token)
        if found is None:
            raw = self.bytes_of(token)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            found = self._seen[token] = (text, raw)
        return found
