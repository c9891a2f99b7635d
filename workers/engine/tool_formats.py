"""Tool calling in each family's own protocol: the prompt that offers tools, the grammar of a forced call,
and the parser that reads calls back from an answer. Which protocol a model speaks is family data
(workers/models/families.py: `Family.tool_format`, `TEMPLATE_TOOL_MARKERS`).

Messages here are the worker's normalized ones: {"role": system|user|assistant|tool, "content": str,
"tool_calls": [{"id", "name", "arguments": JSON text}] (assistant), "tool_call_id" (tool)}; tools are
[{"name", "description", "parameters": JSON schema}]; a choice is "auto", "none", "required" or a name.

`parse` never fails: an answer that is not a valid call of an offered tool is returned as text.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

from workers.models import families
from workers.models.families import (TOOLS_CHATGLM3, TOOLS_HERMES, TOOLS_LLAMA3_JSON, TOOLS_QWEN_REACT)

AUTO, NONE, REQUIRED = "auto", "none", "required"

# ChatGLM3's own demo system prompt for tools (its tokenizer appends the tools as indented JSON).
CHATGLM3_TOOLS_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"

# Qwen-7B-Chat's ReAct prompt, as Qwen's openai_api.py writes it.
QWEN_TOOL_DESC = ("{name}: Call this tool to interact with the {name} API. What is the {name} API useful for? "
                  "{description} Parameters: {parameters}")
QWEN_REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""

# For a chat template that renders no tools: Hermes' function-calling system prompt.
HERMES_SYSTEM = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass
class Call:
    name: str
    arguments: str  # JSON text of an object

    def as_dict(self) -> dict:
        return {"name": self.name, "arguments": self.arguments}


def template_text(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(v) for v in template.values())
    if isinstance(template, list):
        return "\n".join(str(t.get("template", "")) if isinstance(t, dict) else str(t) for t in template)
    return template or ""


def template_takes_tools(tokenizer) -> bool:
    return "tools" in template_text(tokenizer)


def format_for(family, tokenizer) -> str:
    """The tool protocol of a model: its family's, else the one its chat template writes, else Hermes."""
    if family is not None and family.tool_format:
        return family.tool_format
    text = template_text(tokenizer)
    for marker, fmt in families.TEMPLATE_TOOL_MARKERS:
        if marker in text:
            return fmt
    return TOOLS_HERMES


def stop_strings(fmt: str) -> tuple[str, ...]:
    return (families.QWEN_REACT_STOP,) if fmt == TOOLS_QWEN_REACT else ()


def _openai_tools(tools: list[dict]) -> list[dict]:
    return [{"type": "function", "function": t} for t in tools]


def _arguments_object(arguments: str):
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value


# --- prompts -----------------------------------------------------------------------------------------------

def template_messages(messages: list[dict], tools: list[dict] | None, takes_tools: bool) -> list[dict]:
    """Messages for a chat template: OpenAI's shape (arguments as objects, as Hugging Face templates expect),
    or, for a template that renders no tools, Hermes' system prompt and tags written into plain turns."""
    if takes_tools:
        out = []
        for m in messages:
            item = {"role": m["role"], "content": m["content"]}
            if m.get("tool_calls"):
                item["tool_calls"] = [{"id": c.get("id"), "type": "function", "function": {
                    "name": c["name"], "arguments": _arguments_object(c["arguments"])}} for c in m["tool_calls"]]
            if m["role"] == "tool":
                item["tool_call_id"] = m.get("tool_call_id")
                item["name"] = m.get("name")
            out.append(item)
        return out
    out = []
    if tools:
        block = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in _openai_tools(tools)))
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + block})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
    for m in messages:
        if m["role"] == "tool":
            text = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text})
        elif m.get("tool_calls"):
            calls = "\n".join(f"<tool_call>\n{json.dumps({'name': c['name'], 'arguments': _arguments_object(c['arguments'])}, ensure_ascii=False)}\n</tool_call>"
                              for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + calls})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def chatglm3_kwargs(arguments: str) -> str:
    """A call's JSON arguments as the keyword arguments of ChatGLM3's `tool_call(...)` line."""
    value = _arguments_object(arguments)
    if not isinstance(value, dict):
        return ""
    return ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in value.items() if k.isidentifier())


def chatglm3_turns(messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], str, str]:
    """(history, query, role) for ChatGLM3's build_chat_input: tools in a system item, a call as an assistant
    item whose metadata is the tool name, a tool result as an `observation` turn."""
    history: list[dict] = []
    rest = messages
    if tools:
        system = CHATGLM3_TOOLS_SYSTEM
        if rest and rest[0]["role"] == "system":
            system, rest = rest[0]["content"], rest[1:]
        history.append({"role": "system", "content": system, "tools": tools})
    for m in rest:
        if m["role"] == "assistant" and m.get("tool_calls"):
            if m["content"]:
                history.append({"role": "assistant", "metadata": "", "content": m["content"]})
            for c in m["tool_calls"]:
                history.append({"role": "assistant", "metadata": c["name"],
                                "content": f"```python\ntool_call({chatglm3_kwargs(c['arguments'])})\n```"})
        elif m["role"] == "tool":
            history.append({"role": "observation", "content": m["content"]})
        elif m["role"] == "assistant":
            history.append({"role": "assistant", "metadata": "", "content": m["content"]})
        else:
            history.append({"role": m["role"], "content": m["content"]})
    last = history.pop()
    return history, last["content"], last["role"]


def qwen_react_turns(messages: list[dict], tools: list[dict] | None,
                     default_system: str) -> tuple[str, list[tuple[str, str]], str, str | None]:
    """(system, [(query, answer)], question, open_answer) as Qwen's openai_api.py builds them: the ReAct
    instruction before the last turn's question, calls and results written into the assistant's text.
    `open_answer`: after a tool result, the assistant text the model continues (else None)."""
    rest = messages
    system = default_system
    if rest and rest[0]["role"] == "system":
        system, rest = rest[0]["content"].lstrip("\n").rstrip(), rest[1:]
    instruction = ""
    if tools:
        tools_text = "\n\n".join(QWEN_TOOL_DESC.format(name=t["name"], description=t.get("description") or "",
                                                       parameters=json.dumps(t.get("parameters") or {}, ensure_ascii=False))
                                 for t in tools)
        instruction = QWEN_REACT_INSTRUCTION.format(tools_text=tools_text,
                                                    tools_name_text=", ".join(t["name"] for t in tools))
    turns: list[list] = []  # [role, text]
    for i, m in enumerate(rest):
        content = (m["content"] or "").lstrip("\n").rstrip()
        if m["role"] == "tool":
            if not turns or turns[-1][0] != "assistant":
                raise ValueError("a tool result must follow the assistant message that called the tool")
            turns[-1][1] += f"\nObservation: {content}"
            if i == len(rest) - 1:
                turns[-1][1] += "\nThought:"
        elif m["role"] == "assistant":
            if m.get("tool_calls"):
                text = content if content.startswith("Thought:") else f"Thought: {content}"
                for c in m["tool_calls"]:
                    text += f"\nAction: {c['name']}\nAction Input: {c['arguments']}"
            elif tools:
                text = f"Thought: I now know the final answer.\nFinal Answer: {content}"
            else:
                text = content
            if turns and turns[-1][0] == "assistant":
                turns[-1][1] += "\n" + text
            else:
                turns.append(["assistant", text])
        else:
            turns.append(["user", content])
    open_answer = turns.pop()[1] if turns and turns[-1][0] == "assistant" else None
    if not turns or turns[-1][0] != "user" or len(turns) % 2 == 0:
        raise ValueError("Qwen-7B-Chat's format takes turns alternating user and assistant, ending with a user "
                         "message or a tool result")
    if instruction:
        turns[-1][1] = f"{instruction}\n\nQuestion: {turns[-1][1]}"
    question = turns.pop()[1]
    pairs = []
    for i in range(0, len(turns), 2):
        if turns[i][0] != "user" or turns[i + 1][0] != "assistant":
            raise ValueError("Qwen-7B-Chat's format takes turns alternating user and assistant")
        pairs.append((turns[i][1], turns[i + 1][1]))
    return system, pairs, question, open_answer


# --- forced calls ------------------------------------------------------------------------------------------

def _schema(tool: dict) -> dict:
    params = tool.get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object", "properties": {}}


def call_grammar(fmt: str, tools: list[dict], choice):
    """The grammar of one call of `choice` (a tool name) or, for "required", of any offered tool."""
    from workers.engine import constraint as c

    chosen = [t for t in tools if t["name"] == choice] if choice not in (AUTO, NONE, REQUIRED) else list(tools)
    alternatives = []
    for t in chosen:
        params = _schema(t)
        if fmt == TOOLS_CHATGLM3:
            alternatives.append(c.sequence(c.literal(f"{t['name']}\n ```python\ntool_call("),
                                           *chatglm3_kwargs_grammar(params), c.literal(")\n```")))
        elif fmt == TOOLS_QWEN_REACT:
            alternatives.append(c.sequence(c.literal(f"Action: {t['name']}\nAction Input: "), c.json_value(params)))
        else:
            key = "parameters" if fmt == TOOLS_LLAMA3_JSON else "arguments"
            alternatives.append(c.json_value({"type": "object", "properties": {
                "name": {"const": t["name"]}, key: params}, "required": ["name", key], "additionalProperties": False}))
    body = c.either(*alternatives)
    if fmt == TOOLS_HERMES:
        return c.sequence(c.literal("<tool_call>\n"), body, c.literal("\n</tool_call>"))
    return body


def chatglm3_kwargs_grammar(params: dict) -> list:
    """`k1=<JSON>, k2=<JSON>` for the schema's required properties (all properties when none is required)."""
    from workers.engine import constraint as c

    props = params.get("properties") or {}
    names = [n for n in (params.get("required") or list(props)) if str(n).isidentifier()]
    parts = []
    for i, name in enumerate(names):
        parts.append(c.literal(("" if i == 0 else ", ") + f"{name}="))
        parts.append(c.json_value(props.get(name) or {}))
    return parts


# --- reading calls back ------------------------------------------------------------------------------------

def _known(name: str, tools: list[dict]) -> bool:
    return any(t["name"] == name for t in tools)


def _json_object_text(text: str) -> str | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def _parse_hermes(text: str, tools: list[dict]) -> tuple[str, list[Call]]:
    calls, pieces, pos = [], [], 0
    for m in re.finditer(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.S):
        try:
            value = json.loads(m.group(1))
        except ValueError:
            continue
        if not (isinstance(value, dict) and isinstance(value.get("name"), str) and _known(value["name"], tools)):
            continue
        args = value.get("arguments", value.get("parameters", {}))
        if isinstance(args, str):
            args = _json_object_text(args)
            if args is None:
                continue
        elif not isinstance(args, dict):
            continue
        else:
            args = json.dumps(args, ensure_ascii=False)
        calls.append(Call(value["name"], args))
        pieces.append(text[pos:m.start()])
        pos = m.end()
    pieces.append(text[pos:])
    return ("".join(pieces).strip() if calls else text), calls


def _parse_llama3(text: str, tools: list[dict]) -> tuple[str, list[Call]]:
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):]
    calls = []
    for part in [p for p in body.split(";") if p.strip()] or [""]:
        try:
            value = json.loads(part)
        except ValueError:
            return text, []
        if not (isinstance(value, dict) and isinstance(value.get("name"), str) and _known(value["name"], tools)):
            return text, []
        args = value.get("parameters", value.get("arguments", {}))
        if not isinstance(args, dict):
            return text, []
        calls.append(Call(value["name"], json.dumps(args, ensure_ascii=False)))
    return "", calls


_PY_CONSTANTS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


def _literal(node):
    if isinstance(node, ast.Name) and node.id in _PY_CONSTANTS:
        return _PY_CONSTANTS[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def _parse_chatglm3(text: str, tools: list[dict]) -> tuple[str, list[Call]]:
    part = text.split("<|assistant|>")[-1]
    if "\n" not in part:
        return text, []
    name, body = part.split("\n", 1)
    name = name.strip()
    if not _known(name, tools):
        return text, []
    m = re.search(r"tool_call\((.*)\)", body, re.S)
    if m is None:
        return text, []
    try:
        call = ast.parse(f"f({m.group(1)})", mode="eval").body
        if call.args:
            return text, []
        args = {kw.arg: _literal(kw.value) for kw in call.keywords if kw.arg is not None}
        arguments = json.dumps(args, ensure_ascii=False)
    except (SyntaxError, ValueError, TypeError, RecursionError):
        return text, []
    return "", [Call(name, arguments)]


def _parse_qwen_react(text: str, tools: list[dict]) -> tuple[str, list[Call]]:
    # As Qwen's openai_api.py parse_response does, a call at the very start of the answer included.
    padded = "\n" + text
    i, j = padded.find("\nAction:"), padded.find("\nAction Input:")
    if 0 <= i < j:
        k = padded.find("\nObservation:", j)
        name = padded[i + len("\nAction:"):j].strip()
        args = padded[j + len("\nAction Input:"):k if k >= 0 else len(padded)].strip()
        arguments = _json_object_text(args)
        if _known(name, tools) and arguments is not None:
            thought = padded[:i]
            t = thought.find("Thought: ")
            if t >= 0:
                thought = thought[t + len("Thought: "):]
            return thought.strip(), [Call(name, arguments)]
    z = text.rfind("\nFinal Answer: ")
    if z >= 0:
        return text[z + len("\nFinal Answer: "):], []
    if text.startswith("Final Answer: "):
        return text[len("Final Answer: "):], []
    return text, []


PARSERS = {TOOLS_HERMES: _parse_hermes, TOOLS_LLAMA3_JSON: _parse_llama3, TOOLS_CHATGLM3: _parse_chatglm3,
           TOOLS_QWEN_REACT: _parse_qwen_react}


def parse(fmt: str, text: str, tools: list[dict]) -> tuple[str, list[Call]]:
    """(content, calls) of an answer; (text, []) when it holds no valid call of an offered tool."""
    try:
        return PARSERS[fmt](text, tools)
    except Exception:  # noqa: BLE001 - a reply that is no valid call is text, never an error
        return text, []
