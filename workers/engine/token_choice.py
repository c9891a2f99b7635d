"""The one place where a row's logits become the next token: used by generate() (as a logits processor), the
continuous batcher and the neural-speed runners alike (engine/sequence.py), so every path chooses the same way.

For one job, in this order:
- logprobs, when asked: log_softmax of the model's raw logits, before bias, penalties, temperature and top-p
  (what OpenAI's API returns: the model's own distribution, not the one the token was drawn from);
- `logit_bias` added to the logits (OpenAI's {token id: -100..100});
- per-job masks (`Job.logits_masks`: structured output adds one; each returns an additive mask or None);
- the penalties and sampling warpers generate() would apply (repetition, presence/frequency, temperature,
  top-k, top-p);
- greedy argmax, or a draw from the softmax with the job's own torch.Generator when it has a `seed`, so a
  seeded answer is the same alone and in a batch beside other requests (the global generator otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

@dataclass
class TokenLogprob:
    """A chosen token, its logprob, and the `top` most likely tokens with theirs (most likely first); a prompt's
    first token has neither (None)."""
    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI's presence/frequency penalties over the tokens generated so far (not the prompt)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_len:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def is_greedy(job) -> bool:
    return job.temperature <= 1e-5  # as the models' own chat code does with do_sample=False


def logits_processors(job) -> LogitsProcessorList:
    """What generate() applies for this job, in generate()'s order: penalties, then the sampling warpers."""
    chain = LogitsProcessorList()
    if job.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(job.repetition_penalty))
    if job.presence_penalty or job.frequency_penalty:
        chain.append(PresenceFrequencyPenalty(len(job.prompt_ids), job.presence_penalty, job.frequency_penalty))
    if not is_greedy(job):
        chain.append(TemperatureLogitsWarper(job.temperature))
        if job.top_k and job.top_k > 0:
            chain.append(TopKLogitsWarper(job.top_k))
        if job.top_p < 1.0:
            chain.append(TopPLogitsWarper(job.top_p))
    return chain


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely (token, logprob) of a (vocab,) log-distribution, most likely first."""
    if k <= 0:
        return []
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return list(zip(ids.tolist(), values.tolist()))


def prompt_logprobs(ids: list[int], logits: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Each prompt token's logprob given the tokens before it, from the logits (len(ids), vocab) of every
    position; the first token has none."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out = [TokenLogprob(ids[0], None, None)]
    for pos in range(1, len(ids)):
        row = logprobs[pos - 1]
        out.append(TokenLogprob(ids[pos], float(row[ids[pos]]), top_logprobs(row, k)))
    return out


class TokenChooser:
    """Chooses one job's tokens. `job.logprobs`: None for none, else how many top logprobs (0..20) to record;
    the chosen tokens' TokenLogprob entries are appended to `job.chosen_logprobs`."""

    def __init__(self, job):
        self.job = job
        self.processors = logits_processors(job)
        self.greedy = is_greedy(job)
        self.generator = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
        self._bias: torch.Tensor | None = None

    def _biased(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.job.logit_bias:
            return logits
        if self._bias is None or self._bias.shape[-1] != logits.shape[-1]:
            self._bias = torch.zeros(logits.shape[-1], dtype=logits.dtype)
            for token, bias in self.job.logit_bias.items():
                if token < logits.shape[-1]:
                    self._bias[token] = bias
        return logits + self._bias

    def choose(self, ids: torch.Tensor, logits: torch.Tensor) -> int:
        """The next token after `ids` (1, length) from its raw logits (1, vocab)."""
        logits = logits.float()
        scores = self._biased(logits)
        for mask in self.job.logits_masks:
            extra = mask(ids[0].tolist())
            if extra is not None:
                scores = scores + extra
        scores = self.processors(ids, scores)
        if self.greedy:
            token = int(scores.argmax(dim=-1))
        else:
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, num_samples=1, generator=self.generator))
        if self.job.logprobs is not None:
            logprobs = torch.log_softmax(logits[0], dim=-1)
            self.job.chosen_logprobs.append(
                TokenLogprob(token, float(logprobs[token]), top_logprobs(logprobs, self.job.logprobs)))
        return token


class ChosenTokenProcessor(LogitsProcessor):
    """generate()'s path: the chooser picks the token and every other is masked, so generate(), run greedy,
    takes it (the job's penalties and warpers are the chooser's, not generate()'s)."""

    def __init__(self, chooser: TokenChooser):
        self.chooser = chooser

    def __call__(self, input_ids, scores):
        token = self.chooser.choose(input_ids, scores)
        out = torch.full_like(scores, float("-inf"))
        out[:, token] = 0.0
        return out
