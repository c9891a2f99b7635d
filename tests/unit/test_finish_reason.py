"""Why an answer ended and its final text (TextAssembler.conclude), the one rule every runner uses."""
from __future__ import annotations

import pytest

from workers.engine.generate import Job, TextAssembler

STOP_TOKEN = 0
PIECES = {1: "Hello", 2: " wor", 3: "ld", 4: "\ufffd"}  # 4: the first bytes of a character not yet complete


def assembled(tokens: list[int], stop_strings=()) -> TextAssembler:
    a = TextAssembler(lambda ids: "".join(PIECES[i] for i in ids), lambda text: text, stop_strings)
    for t in tokens:
        a.add(t)
    return a


def job(max_new_tokens: int = 3) -> Job:
    return Job(prompt_ids=[1], max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, top_k=0,
               repetition_penalty=1.0, stop_token_ids=frozenset({STOP_TOKEN}))


@pytest.mark.parametrize("tokens,last,stops,expected", [
    ([1, 2, 3], 3, (), ("length", "Hello world")),
    ([1, 2], STOP_TOKEN, (), ("stop", "Hello wor")),                # a stop token (not part of the text)
    ([1, 2, 3], 3, ("wor",), ("stop", "Hello ")),                   # a stop string, cut off
    ([1], 1, (), ("stop", "Hello")),                                 # the model's own end before max_new_tokens
    ([1, 2, 4], 4, (), ("length", "Hello wor")),                    # cut inside a character: the half is dropped
])
def test_reason_and_final_text(tokens, last, stops, expected):
    assert assembled(tokens, stops).conclude(job(), last) == expected


def test_a_cancelled_job_says_cancelled_and_a_given_reason_wins():
    j = job()
    j.cancel.set()
    assert assembled([1, 2, 3]).conclude(j, 3) == ("cancelled", "Hello world")
    assert assembled([1]).conclude(job(), 1, "cancelled") == ("cancelled", "Hello")
