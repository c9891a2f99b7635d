"""The web page's pure parts: reasoning split, what is sent to the worker, model order, saved chats.
(The page itself is driven in Chromium by tests/integration/test_web_ui.py.)"""
from __future__ import annotations

from workers.config.schema import ModelSpec
from workers.serving import web_chat, web_storage
from workers.serving.web_chat import split_reasoning


def test_reasoning_between_the_markers_is_split_off():
    assert split_reasoning("<think>\nLet me add 2 and 2.\n</think>\n\nIt is 4.") == ("Let me add 2 and 2.", "It is 4.")


def test_reasoning_still_streaming_has_no_answer_yet():
    assert split_reasoning("<think>First, the capital") == ("First, the capital", "")


def test_opening_marker_written_by_the_template_leaves_only_the_closing_one():
    assert split_reasoning("hmm, France.</think>Paris.") == ("hmm, France.", "Paris.")


def test_text_without_markers_is_all_answer():
    assert split_reasoning("Paris is the capital. Use <b>tags</b>.") == ("", "Paris is the capital. Use <b>tags</b>.")


def test_a_familys_own_markers():
    assert split_reasoning("[THINK]x[/THINK]y", ("[THINK]", "[/THINK]")) == ("x", "y")
    assert split_reasoning("<think>x</think>y", ("[THINK]", "[/THINK]")) == ("", "<think>x</think>y")


def test_stream_chunks_with_or_without_the_workers_own_split():
    answer = web_chat.Answer()
    answer.take({"text": "<think>hmm</think>Paris"})
    assert (answer.reasoning, answer.text) == ("hmm", "Paris")
    answer.take({"text": "<think>hmm</think>Paris", "reasoning_content": "hmm", "content": "Paris"})
    assert (answer.reasoning, answer.text) == ("hmm", "Paris")
    answer.take({"text": "Paris", "reasoning_content": None, "content": "Paris"})
    assert (answer.reasoning, answer.text) == ("", "Paris")
    answer.done, answer.stats = True, web_chat.stats_line({"completion_tokens": 2}, 1.0)
    assert answer.messages() == [{"role": "assistant", "content": "Paris\n\n<sub>⏱ 2 tokens, 2.0 tok/s</sub>"}]


def test_answer_shows_reasoning_folded_under_a_title_then_the_text():
    shown = web_chat.assistant_messages("step 1", "Done.")
    assert shown == [{"role": "assistant", "content": "step 1", "metadata": {"title": web_chat.REASONING_TITLE}},
                     {"role": "assistant", "content": "Done."}]
    assert web_chat.assistant_messages("", "Done.") == [{"role": "assistant", "content": "Done."}]


def test_worker_gets_plain_turns_without_reasoning_or_stats():
    chat = [{"role": "user", "content": "2+2?", "metadata": {"title": None}},
            {"role": "assistant", "content": "adding", "metadata": {"title": web_chat.REASONING_TITLE}},
            {"role": "assistant", "content": "4" + web_chat.stats_line({"completion_tokens": 3}, 0.5),
             "metadata": {"title": None}},
            {"role": "user", "content": "你好"}]
    assert web_chat.worker_messages(chat) == [{"role": "user", "content": "2+2?"},
                                              {"role": "assistant", "content": "4"},
                                              {"role": "user", "content": "你好"}]


def test_stats_line_names_tokens_and_speed():
    assert web_chat.stats_line({"completion_tokens": 20}, 2.0) == "\n\n<sub>⏱ 20 tokens, 10.0 tok/s</sub>"


def test_only_changed_parameters_are_sent():
    defaults = {"temperature": 0.2, "top_p": 0.9, "max_new_tokens": 512}
    assert web_chat.changed_params({"temperature": 0.2, "top_p": 0.9, "max_new_tokens": 512}, defaults) == {}
    assert web_chat.changed_params({"temperature": 0.0, "top_p": 0.9, "max_new_tokens": 64.0}, defaults) == {
        "temperature": 0.0, "max_new_tokens": 64}
    # Defaults not known (the worker did not answer): everything shown is sent.
    assert web_chat.changed_params({"temperature": 0.5, "top_p": 1.0, "max_new_tokens": 100}, None) == {
        "temperature": 0.5, "top_p": 1.0, "max_new_tokens": 100}


def spec(names, backend):
    return ModelSpec(names=names, source={"embedded": "smollm2-135m-instruct"}, backend=backend, port=21002)


def test_int8_models_come_first_by_backend_not_name():
    deployment = [spec(["zeta-fp32"], "fp32"), spec(["alpha", "alpha-alias"], "bf16"), spec(["omega"], "itrex-int8"),
                  spec(["beta-int8-named"], "fp32"), spec(["delta"], "itrex-int8")]
    listed = ["alpha", "beta-int8-named", "delta", "elsewhere", "omega", "zeta-fp32", "alpha-alias"]
    assert web_chat.int8_first(listed, deployment) == [
        "omega", "delta", "zeta-fp32", "alpha", "alpha-alias", "beta-int8-named", "elsewhere"]


def test_title_is_the_first_question_shortened():
    assert web_chat.title_of([{"role": "user", "content": "  What is\nthe capital of France? " * 4}]).endswith("…")
    assert web_chat.title_of([{"role": "user", "content": "用中文回答：你好吗？"}]) == "用中文回答：你好吗？"
    assert web_chat.title_of([]) == "New chat"


def test_saved_chats_are_checked_and_listed_newest_first():
    good_old = web_storage.record("a", "m", [{"role": "user", "content": "hi"}], "hi", now=1.0)
    good_new = web_storage.record(None, "m", [{"role": "user", "content": "yo"}], "yo", now=2.0)
    saved = [good_old, good_new, {"id": "x"}, {"id": "y", "messages": [{"role": "system", "content": "x"}]}, "junk"]
    chats = web_storage.valid(saved)
    assert set(chats) == {"a", good_new["id"]}
    assert web_storage.listing(chats) == [("yo", good_new["id"]), ("hi", "a")]
    assert web_storage.valid(None) == {}
