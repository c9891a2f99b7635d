"""The API's rules for tools, tool_choice, functions and response_format, and the answers it builds from a
worker's calls (workers/serving/tool_calls.py, through api_policy.chat_request): pure functions, no server."""
from __future__ import annotations

import json

import pytest

from workers.serving import api_policy as policy
from workers.serving import errors, tool_calls
from workers.serving.errors import ApiError

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS = [{"type": "function", "function": WEATHER}]


def chat(**body):
    return policy.chat_request({"model": "m", "messages": USER, **body})


def refused(**body) -> ApiError:
    with pytest.raises(ApiError) as info:
        chat(**body)
    assert info.value.status == 400
    return info.value


def test_tools_reach_the_worker_as_functions_with_the_choice():
    plan = chat(tools=TOOLS, tool_choice="required")
    assert plan.tools.worker_fields() == {"tools": [WEATHER], "tool_choice": "required"}
    named = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.tools.choice == {"name": "get_weather"} and named.tools.active
    assert chat(tools=TOOLS).tools.choice == "auto"
    assert not chat(tools=TOOLS, tool_choice="none").tools.active


def test_older_functions_take_the_same_path():
    plan = chat(functions=[WEATHER], function_call={"name": "get_weather"})
    assert plan.tools.legacy and plan.tools.worker_fields() == {"tools": [WEATHER], "tool_choice": {"name": "get_weather"}}
    assert chat(functions=[WEATHER], function_call="none").tools.choice == "none"


@pytest.mark.parametrize("body,param,fragment", [
    ({"tools": {"a": 1}}, "tools", "must be a list"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "type"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name", "letters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters",
     "JSON schema"),
    ({"tools": TOOLS + TOOLS}, "tools", "twice"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "must be"),
    ({"tools": TOOLS, "functions": [WEATHER]}, "functions", "not both"),
    ({"functions": [WEATHER], "function_call": "required"}, "function_call", "must be"),
    ({"response_format": {"type": "xml"}}, "response_format", "must be"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "'name' and 'schema'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": []}}},
     "response_format.json_schema.schema", "JSON schema"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "exclude"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
])
def test_bad_tool_requests_are_400_naming_the_field(body, param, fragment):
    err = refused(**body)
    assert err.kind is errors.INVALID_VALUE and err.param == param and fragment in err.message, (err.param, err.message)


def test_response_format_reaches_the_worker_as_a_schema():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    plan = chat(response_format={"type": "json_schema", "json_schema": {"name": "A", "schema": schema, "strict": True}})
    assert plan.tools.worker_fields() == {"response_format": {"type": "json_schema", "schema": schema}}
    assert chat(response_format={"type": "json_object"}).tools.worker_fields() == {"response_format": {"type": "json_object"}}
    assert chat(response_format={"type": "text"}).tools.worker_fields() == {}


def test_assistant_calls_and_tool_results_are_kept_for_the_worker():
    plan = chat(tools=TOOLS, messages=USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    assert plan.messages[1:] == [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "name": "get_weather",
                                                             "arguments": '{"city": "Paris"}'}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1", "name": None}]
    legacy = chat(functions=[WEATHER], messages=USER + [
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
        {"role": "function", "name": "get_weather", "content": "sunny"}])
    assert legacy.messages[1]["tool_calls"] == [{"id": None, "name": "get_weather", "arguments": "{}"}]
    assert legacy.messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": None, "name": "get_weather"}


def test_calls_become_tool_calls_with_ids_and_finish_reason():
    plan = chat(tools=TOOLS)
    calls = [{"name": "get_weather", "arguments": '{"city": "Paris"}'}, {"name": "get_weather", "arguments": "{}"}]
    message, finish = tool_calls.message("", calls, plan.tools)
    assert finish == "tool_calls" and message["content"] is None
    assert [c["function"] for c in message["tool_calls"]] == calls
    ids = [c["id"] for c in message["tool_calls"]]
    assert all(i.startswith("call_") for i in ids) and len(set(ids)) == 2
    deltas = tool_calls.deltas(calls, plan.tools)
    assert [d["tool_calls"][0]["index"] for d in deltas] == [0, 1]
    assert json.loads(deltas[0]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}


def test_legacy_answers_use_function_call():
    plan = chat(functions=[WEATHER])
    message, finish = tool_calls.message("thinking", [{"name": "get_weather", "arguments": "{}"}], plan.tools)
    assert finish == "function_call" and message["function_call"] == {"name": "get_weather", "arguments": "{}"}
    assert message["content"] == "thinking"


def test_no_calls_or_choice_none_is_a_text_answer():
    assert tool_calls.message("hi", [], chat(tools=TOOLS).tools) == ({"role": "assistant", "content": "hi"}, None)
    none = chat(tools=TOOLS, tool_choice="none").tools
    assert tool_calls.message("hi", [{"name": "get_weather", "arguments": "{}"}], none)[1] is None
