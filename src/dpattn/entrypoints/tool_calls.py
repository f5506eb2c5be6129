"""Chat tools: `tools` and `tool_choice` validated, the output constraint they imply, and the
model's output parsed back into OpenAI `tool_calls`.

- `tool_choice` "none": the tools are not shown to the model, the output is plain text.
- a named function: the output is that function's arguments (its `parameters` schema).
- "required": a JSON array of `{"name": <a tool>, "parameters": <its arguments>}` (at least
  one; exactly one without `parallel_tool_calls`), as SGLang constrains it.
- "auto" (the default with tools): no constraint; calls written in the Hermes / Qwen format
  (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`) are parsed out of the text.
The prompt rendering (tools through the chat template, or an instruction where the template has
no tool support) is tool_prompt.py.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from dpattn.entrypoints.errors import bad
from dpattn.entrypoints.structured import NAME, Constraint, check_schema, grammar_schema

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# A call's body runs to its closing tag, or to the end of the text (a model that stopped at its
# end-of-turn token before closing the last call).
HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)
DEF_KEYS = ("$defs", "definitions")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        """The tool as chat templates (and OpenAI) take it."""
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict[str, Any]:
        """A message's tool call; with `index`, a stream delta's."""
        out: dict[str, Any] = {} if index is None else {"index": index}
        fn = {"name": self.name, "arguments": self.arguments}
        return {**out, "id": self.id, "type": "function", "function": fn}


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools ask for. mode: none | auto | required | named."""

    tools: tuple[Tool, ...] = ()
    mode: str = "none"
    named: Tool | None = None
    parallel: bool = True

    @property
    def names(self) -> set[str]:
        return {t.name for t in self.tools}

    def constraint(self) -> Constraint | None:
        if self.mode == "named" and self.named is not None:
            return Constraint("json_schema", grammar_schema(self.named.parameters), "tools")
        if self.mode == "required":
            schema = required_schema(list(self.tools), self.parallel)
            return Constraint("json_schema", grammar_schema(schema), "tools")
        return None


def _tool(i: int, t: Any) -> Tool:
    where = f"tools.{i}"
    if not isinstance(t, dict) or t.get("type") != "function":
        raise bad(f"'{where}' must be {{'type': 'function', 'function': {{...}}}}", "tools")
    if set(t) - {"type", "function"}:
        raise bad(f"'{where}' has unknown key(s) {sorted(set(t) - {'type', 'function'})}", "tools")
    fn = t.get("function")
    if not isinstance(fn, dict):
        raise bad(f"'{where}.function' must be an object with a 'name'", "tools")
    if set(fn) - FUNCTION_KEYS:
        raise bad(
            f"'{where}.function' has unknown key(s) {sorted(set(fn) - FUNCTION_KEYS)}", "tools"
        )
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise bad(
            f"'{where}.function.name' must match [a-zA-Z0-9_-]{{1,64}}, got {name!r}", "tools"
        )
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise bad(f"'{where}.function.description' must be a string", "tools")
    if not isinstance(fn.get("strict", False), (bool, type(None))):
        raise bad(f"'{where}.function.strict' must be true or false", "tools")
    params = fn.get("parameters")
    if params is None:  # OpenAI: a function without parameters takes none
        params = EMPTY_PARAMETERS
    check_schema(params, "tools")
    return Tool(name, desc, params)


def _choice(choice: Any, tools: tuple[Tool, ...]) -> tuple[str, Tool | None]:
    if choice is None:
        return ("auto" if tools else "none"), None
    if choice in ("none", "auto", "required"):
        if choice != "none" and not tools:
            raise bad(f"'tool_choice' {choice!r} needs 'tools'", "tool_choice")
        return choice, None
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(fn, dict):
        raise bad(
            "'tool_choice' must be 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    named = next((t for t in tools if t.name == fn.get("name")), None)
    if named is None:
        raise bad(f"'tool_choice' names {fn.get('name')!r}, which is not in 'tools'", "tool_choice")
    return "named", named


def tool_plan(tools: list[Any] | None, choice: Any, parallel: bool | None) -> ToolPlan:
    """Validate `tools` (names unique, parameters a JSON schema) and `tool_choice`."""
    parsed = tuple(_tool(i, t) for i, t in enumerate(tools or []))
    names = [t.name for t in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise bad(f"'tools' names must be unique: {dupes} repeated", "tools")
    mode, named = _choice(choice, parsed)
    return ToolPlan(parsed, mode, named, parallel is not False)


# ---- the "required" schema ----
def _rewrite_refs(node: Any, renames: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {k: _rewrite_refs(v, renames) for k, v in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref in renames:
            out["$ref"] = renames[ref]
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, renames) for v in node]
    return node


def _hoisted(tool: Tool, defs: dict[str, Any]) -> dict[str, Any]:
    """The tool's parameters with its definitions moved into the shared `defs` (renamed by the
    tool, so two tools' same-named definitions do not collide): a `$ref` resolves against the
    root of the combined schema, not of the parameters."""
    params = copy.deepcopy(tool.parameters)
    renames = {"#": f"#/$defs/{tool.name}"}  # a recursive reference to the parameters
    local: dict[str, Any] = {}
    for key in DEF_KEYS:
        for name, sub in (params.pop(key, None) or {}).items():
            renames[f"#/{key}/{name}"] = f"#/$defs/{tool.name}__{name}"
            local[f"{tool.name}__{name}"] = sub
    params = _rewrite_refs(params, renames)
    defs.update({k: _rewrite_refs(v, renames) for k, v in local.items()})
    if _refers_to_root(tool.parameters):
        defs[tool.name] = params
    return params


def _refers_to_root(node: Any) -> bool:
    if isinstance(node, dict):
        return node.get("$ref") == "#" or any(_refers_to_root(v) for v in node.values())
    return isinstance(node, list) and any(_refers_to_root(v) for v in node)


def required_schema(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    """A JSON array of calls, each `{"name": <one of the tools>, "parameters": <its schema>}`."""
    defs: dict[str, Any] = {}
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "parameters": _hoisted(t, defs)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


# ---- parsing the output ----
def _arguments(value: Any) -> str | None:
    if isinstance(value, str):  # some models write the arguments as a JSON string
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def _call(body: str, names: set[str]) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = _arguments(obj.get("arguments", obj.get("parameters", {})))
    return None if args is None else ToolCall(obj["name"], args)


def parse_hermes(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of an "auto" answer: each well-formed `<tool_call>` block naming a
    tool becomes a call; a malformed one stays in the content, as does all other text."""
    calls: list[ToolCall] = []
    parts: list[str] = []
    pos = 0
    for m in HERMES.finditer(text):
        call = _call(m.group(1), names)
        if call is None:
            continue
        parts.append(text[pos : m.start()])
        pos = m.end()
        calls.append(call)
    if not calls:
        return text, []
    content = "".join([*parts, text[pos:]]).strip()
    return content or None, calls


def parse_required(text: str, names: set[str]) -> list[ToolCall] | None:
    """The calls of a "required" answer (the constrained JSON array); None if it is not one
    (the output was cut by max_tokens)."""
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not items:
        return None
    calls = [_call(json.dumps(x), names) for x in items]
    return None if any(c is None for c in calls) else calls  # type: ignore[return-value]
