"""The chat prompt of a request with tools: what the chat template is given.

A template that knows tools (HF's `tools` variable, as Qwen's and Llama's have) gets them and the
history's tool calls / results as HF templates expect them. A template that does not (Gemma 3's,
the tiny models') would drop or reject them, so the tools are described in a system message
instead, with the format to answer in, and the history's calls and results are written out as
text in that same format (results as user turns, since such templates know no tool role).
"""

from __future__ import annotations

import json
from typing import Any

from dpattn.entrypoints.tool_calls import CALL_CLOSE, CALL_OPEN, ToolPlan


def prompt_messages(
    conversation: list[dict[str, Any]], plan: ToolPlan, knows_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for ChatTemplate.render. tool_choice "none": the tools are not shown."""
    shown = plan.mode != "none" and bool(plan.tools)
    if knows_tools:
        return conversation, [t.openai() for t in plan.tools] if shown else None
    messages = _as_text(conversation)
    if shown:
        messages = _with_system(messages, instruction(plan))
    return messages, None


def instruction(plan: ToolPlan) -> str:
    """The tools and the answer format, for a template without tool support."""
    tools = "\n".join(json.dumps(t.openai()["function"], ensure_ascii=False) for t in plan.tools)
    head = f"You can call these functions:\n{tools}\n"
    if plan.mode == "named" and plan.named is not None:
        return f"{head}Call {plan.named.name}: answer with its arguments as one JSON object."
    if plan.mode == "required":
        how = "one or more" if plan.parallel else "exactly one"
        return (
            f"{head}Call {how} of them: answer with a JSON array of calls, each "
            '{"name": <function name>, "parameters": <its arguments as a JSON object>}.'
        )
    return (
        f"{head}To call one, write {CALL_OPEN}\n"
        '{"name": <function name>, "arguments": <its arguments as a JSON object>}\n'
        f"{CALL_CLOSE}\nOtherwise answer directly."
    )


def _call_text(call: dict[str, Any]) -> str:
    fn = call["function"]
    body = json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def _as_text(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool calls and results as plain turns: a call in the assistant's text, a result as a
    user turn (merged with an adjacent one: such templates want the roles to alternate)."""
    out: list[dict[str, Any]] = []
    merge = False  # the last turn came from a tool result
    for m in conversation:
        role, content = m["role"], m["content"]
        if m.get("tool_calls"):
            calls = "\n".join(_call_text(c) for c in m["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        from_tool = role == "tool"
        if from_tool:
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        if out and out[-1]["role"] == role == "user" and (merge or from_tool):
            out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n{content}"}
        else:
            out.append({"role": role, "content": content})
        merge = from_tool
    return out


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
