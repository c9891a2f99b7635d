"""The accepted range of each sampling parameter: one table, read by the worker (served_model: a 400 for a client
of the worker protocol) and by the API (api_policy: a 400 before a request reaches a worker), so nothing the API
lets through is refused by the worker. OpenAI's ranges where it has them.

top_p 0 is its limit (only the most likely token survives, as TopPLogitsWarper keeps one). top_k -1 and 0 both
mean off (FastChat's clients send -1; generation_config.json files say 0); a top_k above the vocabulary keeps
every token. A repetition_penalty of 0 would divide by zero.
"""
from __future__ import annotations

MAX_INT32 = 2**31 - 1

LIMITS: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "top_k": (-1, MAX_INT32),
    "repetition_penalty": (1e-3, 10.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}

# logit_bias values (OpenAI's: -100 bans a token, +100 all but forces it)
LOGIT_BIAS: tuple[float, float] = (-100.0, 100.0)
# top logprobs per token: chat's top_logprobs, completions' logprobs (OpenAI's limits)
TOP_LOGPROBS = {"chat": 20, "completions": 5}
