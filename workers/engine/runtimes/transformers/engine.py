"""Serving a transformers model (fp32/bf16, and qbits INT8 under it): continuous batching (engine/batcher.py)
or one generate() per request, reusing the cache of the longest earlier conversation a prompt continues
(engine/prefix_cache.py), forward passes counted against cores shared by demand (engine/core_share.py), and
embeddings from the last hidden state."""
from __future__ import annotations

import torch

from workers.engine import generate
from workers.engine.batcher import Batcher, batch_axes
from workers.engine.core_share import CoreShare, share_forward
from workers.engine.generate import Job
from workers.engine.prefix_cache import crop
from workers.engine.runtimes.base import Engine

# A one-token forward pass costs about this many tokens of a batched prompt pass (docs/benchmarks.md); a prompt
# continuing an earlier conversation token by token reuses its cache only while that is cheaper than recomputing.
TOKEN_BY_TOKEN_COST = 7


class TransformersEngine(Engine):
    def __init__(self, model, served, share: CoreShare | None = None, batching: bool = True):
        self.model, self.served = model, served
        self.prefixes = served.prefixes
        chat = served.chat
        if share is not None:
            share_forward(model, share)
        axes = batch_axes(chat.family, model) if batching else None
        self.batcher: Batcher | None = None  # None: one generate() per request
        if axes is not None:
            self.batcher = Batcher(model, axes, served.decode, chat.postprocess, self._prefill_reusing,
                                   self._keep if self.prefixes.max_tokens > 0 else None,
                                   chat.family.pad_shifted_rotary if chat.family else None,
                                   chat.family.padded_decode_globals if chat.family else ())
        self.description = "continuous batching" if axes else "one generation at a time per request"

    def batching_state(self) -> dict:
        if self.batcher is not None:
            return {"mode": "continuous batching", "steps": self.batcher.steps, "widest_step": self.batcher.widest}
        return {"mode": "one at a time"}

    def _reusable(self, ids: list[int]) -> tuple[object, int]:
        """The cropped cache of the longest earlier conversation `ids` continues, and its length."""
        if self.prefixes.max_tokens <= 0:
            return None, 0
        entry, reused = self.prefixes.longest(ids)
        new = len(ids) - 1 - reused
        if entry is not None and not self._batched_continuation and new * TOKEN_BY_TOKEN_COST > reused:
            return None, 0  # one forward per new token would cost more than recomputing all
        return (crop(entry, reused), reused) if entry is not None else (None, 0)

    @property
    def _batched_continuation(self) -> bool:
        family = self.served.chat.family
        return family is None or family.batched_continuation

    def _prefill_reusing(self, ids: list[int]) -> tuple[object, torch.Tensor, int]:
        """The batcher's prefill: cache and last logits of `ids`, reusing an earlier conversation's cache."""
        past, reused = self._reusable(ids)
        past, logits = generate.prefill(self.model, ids, past, reused, self._batched_continuation or past is None)
        return past, logits, reused

    def _keep(self, ids: list[int], past) -> None:
        self.prefixes.store(ids, past)

    def submit(self, job: Job, on_text=None) -> generate.Result:
        """Generate, reusing the cache of the longest earlier conversation this prompt continues."""
        if self.batcher is not None:
            return self.batcher.submit(job, on_text)
        served = self.served
        pad = getattr(served.tokenizer, "pad_token_id", None)
        keep = self.prefixes.max_tokens > 0
        past, reused = self._reusable(job.prompt_ids)
        if past is not None:
            # Everything but the last prompt token goes into the cache; generate() takes that one.
            past, _ = generate.prefill(self.model, job.prompt_ids[:-1], past, reused, self._batched_continuation)
        result = generate.run(self.model, served.decode, served.chat.postprocess, job, on_text, pad_token_id=pad,
                              past=past, keep_cache=keep)
        result.reused_tokens = reused
        if keep and result.past is not None:
            self.prefixes.store(result.cached_ids, result.past)
            result.past = None
        return result

    def prompt_logits(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            x = torch.tensor([ids])
            return self.model(input_ids=x, attention_mask=torch.ones_like(x), return_dict=True).logits[0]

    def embeddings(self, inputs: list[list[int]]) -> list[list[float]]:
        """Mean of the last hidden state over each input's tokens, L2-normalised; one input at a time, so no padding
        token is needed (Qwen's tokenizer has none)."""
        vectors = []
        with torch.inference_mode():
            for ids in inputs:
                x = torch.tensor([ids])
                out = self.model(input_ids=x, attention_mask=torch.ones_like(x), output_hidden_states=True,
                                 return_dict=True)
                hidden = out.hidden_states[-1]
                if hidden.shape[0] == len(ids) and hidden.shape[1] == 1 and len(ids) != 1:  # ChatGLM: seq first
                    hidden = hidden.transpose(0, 1)
                v = hidden[0].float().mean(dim=0)
                vectors.append(torch.nn.functional.normalize(v, dim=0).tolist())
        return vectors
