"""A reasoning model's answer split into its thinking (`reasoning_content`) and its answer (`content`).

Reasoning models (Qwen3, the DeepSeek-R1 distills, SmolLM3, ...) write their thinking between two
markers, `<think>` ... `</think>` (families.REASONING_MARKERS), then the answer. Some chat templates
write the opening marker at the end of the prompt themselves (the R1 distills: "<｜Assistant｜><think>\\n"),
so the answer then starts inside the thinking with no opening marker of its own; others leave it to
the model (Qwen3), or close an empty block in the prompt to switch thinking off (Qwen3 with
`enable_thinking: false`: "<think>\\n\\n</think>\\n\\n"). Which case a request is in is read from its
prompt: it opens the thinking when its last marker is an opening one followed by nothing but white
space (llama.cpp's "thinking forced open"), whatever the template.

`Thinking.text(answer)` is the answer with its markers balanced (the opening marker put back in front
when the prompt wrote it): what the worker streams as `text` (the web page folds the thinking by its
markers). `split(text, final)` cuts such a text into (reasoning, content):
- thinking is recognised only at the start of the answer (after white space); a marker later in the
  answer is content, as is an answer without any; an opening marker the model repeats after the
  prompt's is dropped;
- no closing marker yet (still thinking, or cut by max_tokens): all of it is reasoning, content "";
- white space around the reasoning and before the content is dropped (the templates write newlines
  there: Qwen3 puts "\\n" after `<think>` and "\\n\\n" after `</think>`);
- `final=False` (a stream under way) holds back what may still change: the start of a marker split
  across tokens ("</th"), white space that may turn out to end the reasoning, and leading text that
  may be the opening marker. So every streamed (reasoning, content) is a prefix pair of the final one:
  the concatenated stream deltas equal the non-streamed fields.
"""
from __future__ import annotations

from dataclasses import dataclass


def _cut_partial(text: str, marker: str) -> str:
    """`text` without a trailing proper prefix of `marker` (a marker whose tokens are still coming)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return text[:-k]
    return text


def split(text: str, start: str, end: str, final: bool = True) -> tuple[str | None, str]:
    """(reasoning, content) of an answer text with its markers (see the module docstring). reasoning is
    None when the answer does not start with a thinking block (or, streaming, cannot be known yet: then
    content is "" too)."""
    body = text.lstrip()
    if not body.startswith(start):
        if not final and start.startswith(body):
            return None, ""  # nothing yet, or the opening marker still coming in
        return None, text
    inner = body[len(start):]
    again = inner.lstrip()
    if again.startswith(start):  # the model wrote the marker the prompt had opened already (R1 distills may)
        inner = again[len(start):]
    elif not final and again and start.startswith(again):
        return "", ""
    closed = inner.find(end)
    if closed >= 0:
        content = inner[closed + len(end):].lstrip()
        return inner[:closed].strip(), content
    if final:
        return inner.strip(), ""
    return _cut_partial(inner, end).strip(), ""


@dataclass(frozen=True)
class Thinking:
    """How one request's answer carries its thinking: the markers, and whether the prompt opened it."""

    start: str
    end: str
    opened_by_prompt: bool = False

    def text(self, answer: str) -> str:
        """The answer with its markers balanced: the opening marker in front when the prompt wrote it."""
        return self.start + answer if self.opened_by_prompt else answer

    def split(self, answer: str, final: bool = True) -> tuple[str, str]:
        """(reasoning, content) of the generated answer; reasoning "" when the model did not think."""
        reasoning, content = split(self.text(answer), self.start, self.end, final)
        return reasoning or "", content


def opened_by_prompt(prompt_ids: list[int], start_id: int, end_id: int, decode) -> bool:
    """Does the prompt end inside an open thinking block: its last marker token is the opening one, and
    only white space follows it? `decode(ids)` is the tokenizer's decode."""
    last_start = max((i for i, t in enumerate(prompt_ids) if t == start_id), default=-1)
    if last_start < 0:
        return False
    if end_id in prompt_ids[last_start + 1:]:
        return False
    return not decode(prompt_ids[last_start + 1:]).strip()
