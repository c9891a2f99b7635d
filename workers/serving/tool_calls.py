"""The API's side of tool calling and structured output, as pure functions (unit-tested without a server).

Requests: `tools` [{"type": "function", "function": {"name", "description", "parameters"}}] with
`tool_choice` ("auto" | "none" | "required" | {"type": "function", "function": {"name"}}), or the older
`functions` [{"name", ...}] with `function_call` ("auto" | "none" | {"name"}), which take the same path;
`response_format` {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}.
The worker gets `tools` as [{"name", "description", "parameters"}], `tool_choice` as "auto" | "none" |
"required" | {"name"}, `response_format` as {"type", "schema"}: it renders the tools in the model's own
protocol, constrains forced calls and JSON answers by grammar, and returns the calls it reads back in its
last chunk ("tool_calls": [{"name", "arguments"}]).

Answers: calls become `message.tool_calls` (ids "call_..."), finish_reason "tool_calls"; with `functions`,
`message.function_call` (the first call) and finish_reason "function_call".
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import shortuuid

from workers.serving import errors
from workers.serving.errors import ApiError

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128


@dataclass
class ToolPlan:
    tools: list[dict] = field(default_factory=list)  # [{"name", "description", "parameters"}]
    choice: Any = "auto"                              # "auto" | "none" | "required" | {"name": str}
    legacy: bool = False                              # asked with functions/function_call
    response_format: Optional[dict] = None            # {"type": "json_object"} | {"type": "json_schema", "schema"}

    @property
    def active(self) -> bool:
        """Calls may come back (the answer is read for them)."""
        return bool(self.tools) and self.choice != "none"

    def worker_fields(self) -> dict:
        out: dict = {}
        if self.tools:
            out["tools"], out["tool_choice"] = self.tools, self.choice
        if self.response_format is not None:
            out["response_format"] = self.response_format
        return out


def _invalid(message: str, param: str) -> ApiError:
    return ApiError(errors.INVALID_VALUE, message, param)


def _function(spec: Any, where: str) -> dict:
    if not isinstance(spec, dict):
        raise _invalid(f"{where} must be an object with a 'name' (got {errors.short(spec)})", where)
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise _invalid(f"{where}.name must be 1 to 64 letters, digits, '_' or '-' (got {errors.short(name)})",
                       f"{where}.name")
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise _invalid(f"{where}.description must be a string", f"{where}.description")
    params = spec.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise _invalid(f"{where}.parameters must be a JSON schema object (got {errors.short(params)})",
                       f"{where}.parameters")
    return {"name": name, "description": description or "",
            "parameters": params if params is not None else {"type": "object", "properties": {}}}


def _tools(body: dict) -> tuple[list[dict], bool]:
    tools, functions = body.get("tools"), body.get("functions")
    if tools and functions:
        raise _invalid("give tools or functions (the older form), not both", "functions")
    legacy = bool(functions)
    given, param = (functions, "functions") if legacy else (tools, "tools")
    if given is None:
        return [], False
    if not isinstance(given, list):
        raise _invalid(f"{param} must be a list (got {errors.short(given)})", param)
    if len(given) > MAX_TOOLS:
        raise _invalid(f"{param} has {len(given)} entries; at most {MAX_TOOLS} are allowed", param)
    out = []
    for i, t in enumerate(given):
        where = f"{param}[{i}]"
        if legacy:
            out.append(_function(t, where))
            continue
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise _invalid(f'{where} must be {{"type": "function", "function": {{...}}}} (got {errors.short(t)})',
                           f"{where}.type")
        out.append(_function(t.get("function"), f"{where}.function"))
    names = [t["name"] for t in out]
    if len(set(names)) != len(names):
        raise _invalid(f"{param} names a function twice", param)
    return out, legacy


def _choice(body: dict, tools: list[dict], legacy: bool):
    param = "function_call" if legacy or body.get("function_call") is not None else "tool_choice"
    value = body.get(param)
    if value is None or value == "auto":
        return "auto"
    if value == "none":
        return "none"
    if value == "required" and param == "tool_choice":
        name = None
    elif isinstance(value, dict):
        fn = value.get("function") if param == "tool_choice" else value
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            shape = '{"type": "function", "function": {"name": ...}}' if param == "tool_choice" else '{"name": ...}'
            raise _invalid(f"{param} must be 'none', 'auto'{', required' if param == 'tool_choice' else ''} "
                           f"or {shape} (got {errors.short(value)})", param)
    else:
        raise _invalid(f"{param} must be 'none', 'auto'{', required' if param == 'tool_choice' else ''} or name a "
                       f"function (got {errors.short(value)})", param)
    if not tools:
        raise _invalid(f"{param} {errors.short(value)} needs {'functions' if legacy else 'tools'} to choose from",
                       param)
    if name is None:
        return "required"
    if name not in {t["name"] for t in tools}:
        raise _invalid(f"{param} names {name!r}, which is not one of the given functions "
                       f"({', '.join(t['name'] for t in tools)})", param)
    return {"name": name}


def _response_format(body: dict) -> Optional[dict]:
    value = body.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise _invalid("response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                       f"{{\"type\": \"json_schema\", \"json_schema\": {{...}}}} (got {errors.short(value)})",
                       "response_format")
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return {"type": "json_object"}
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _invalid("response_format.json_schema must be an object with 'name' and 'schema'",
                       "response_format.json_schema")
    if not isinstance(spec.get("name"), str) or not NAME.match(spec["name"]):
        raise _invalid("response_format.json_schema.name must be 1 to 64 letters, digits, '_' or '-'",
                       "response_format.json_schema.name")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise _invalid("response_format.json_schema.schema must be a JSON schema object",
                       "response_format.json_schema.schema")
    if spec.get("strict") not in (None, True, False):
        raise _invalid("response_format.json_schema.strict must be true or false", "response_format.json_schema.strict")
    return {"type": "json_schema", "schema": schema}


def plan(body: dict) -> ToolPlan:
    tools, legacy = _tools(body)
    choice = _choice(body, tools, legacy)
    fmt = _response_format(body)
    if fmt is not None and tools and choice not in ("auto", "none"):
        raise _invalid("a forced tool call (tool_choice) and a JSON response_format exclude each other: the answer "
                       "is a call", "response_format")
    if body.get("parallel_tool_calls") not in (None, True, False):
        raise _invalid("parallel_tool_calls must be true or false", "parallel_tool_calls")
    return ToolPlan(tools, choice, legacy, fmt)


# --- messages ---------------------------------------------------------------------------------------------------

def assistant_calls(m: dict, at: str) -> list[dict]:
    """An assistant message's tool_calls (or legacy function_call) as [{"id", "name", "arguments"}]."""
    calls = m.get("tool_calls")
    legacy = m.get("function_call")
    if calls in (None, []) and legacy in (None, {}):
        return []
    if calls not in (None, []):
        if not isinstance(calls, list):
            raise _invalid(f"{at}.tool_calls must be a list (got {errors.short(calls)})", f"{at}.tool_calls")
        items = [(c, f"{at}.tool_calls[{i}]") for i, c in enumerate(calls)]
    else:
        items = [({"id": None, "type": "function", "function": legacy}, f"{at}.function_call")]
    out = []
    for c, where in items:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise _invalid(f'{where} must be {{"id", "type": "function", "function": {{"name", "arguments": '
                           f'a JSON string}}}} (got {errors.short(c)})', where)
        out.append({"id": c.get("id") if isinstance(c.get("id"), str) else None, "name": fn["name"],
                    "arguments": fn["arguments"]})
    return out


# --- answers ---------------------------------------------------------------------------------------------------

def call_id() -> str:
    return f"call_{shortuuid.random(24)}"


def with_ids(calls: list[dict]) -> list[dict]:
    """The worker's calls in OpenAI's shape, each with a fresh id."""
    return [{"id": call_id(), "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls]


def message(text: str, calls: list[dict] | None, plan_: ToolPlan) -> tuple[dict, Optional[str]]:
    """The answer's message and, when it calls tools, the finish_reason that says so (else None)."""
    if not calls or not plan_.active:
        return {"role": "assistant", "content": text}, None
    if plan_.legacy:
        first = calls[0]
        return ({"role": "assistant", "content": text or None,
                 "function_call": {"name": first["name"], "arguments": first["arguments"]}}, "function_call")
    return {"role": "assistant", "content": text or None, "tool_calls": with_ids(calls)}, "tool_calls"


def deltas(calls: list[dict], plan_: ToolPlan) -> list[dict]:
    """Stream deltas for the calls: one per call (name, id and whole arguments at once)."""
    if plan_.legacy:
        return [{"function_call": {"name": calls[0]["name"], "arguments": calls[0]["arguments"]}}]
    return [{"tool_calls": [{"index": i, **c}]} for i, c in enumerate(with_ids(calls))]


def arguments_valid(arguments: str) -> bool:
    try:
        return isinstance(json.loads(arguments), dict)
    except ValueError:
        return False
