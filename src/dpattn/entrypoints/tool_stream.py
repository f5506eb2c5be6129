"""One chat choice's answer under its request's tools: the message (non-streaming) or the
stream deltas, from the text the model wrote.

- no tools / "none": the text is the content.
- a named function: the text is the call's arguments. Streamed: the first delta opens the call
  (index 0, id, type, name, arguments ""), then each piece of text is an arguments delta.
- "required": the text is a JSON array of calls, parsed at the end (streamed: all calls in the
  last deltas).
- "auto": text outside `<tool_call>` blocks is content; streamed, it goes out as it comes, and
  from the first block on (or what may be its start) the text is held and parsed at the end.
A request whose calls were parsed finishes with "tool_calls"; one cut by max_tokens before its
calls parse keeps "length" (the named call's arguments are then partial, as OpenAI's are).
"""

from __future__ import annotations

from typing import Any

from dpattn.entrypoints.tool_calls import (
    CALL_OPEN,
    ToolCall,
    ToolPlan,
    parse_hermes,
    parse_required,
)

Deltas = list[dict[str, Any]]


def _calls_delta(calls: list[ToolCall]) -> dict[str, Any]:
    return {"tool_calls": [c.openai(i) for i, c in enumerate(calls)]}


def _open_tail(text: str) -> int:
    """Length of the longest tail of text that could grow into `<tool_call>`."""
    for k in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if text.endswith(CALL_OPEN[:k]):
            return k
    return 0


class ChoiceOutput:
    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.mode = plan.mode if plan.tools else "none"
        named = plan.named.name if plan.named is not None else ""
        self.call = ToolCall(named, "")  # the named call (its id is the stream's)
        self.text = ""  # all text so far
        self.sent = 0  # auto: characters released as content
        self.held = False  # auto: a tool call has begun: the rest waits for the end

    # ---- non-streaming ----
    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The choice's message and finish_reason."""
        calls: list[ToolCall] | None = None
        content: str | None = text
        if self.mode == "named":
            calls, content = [ToolCall(self.call.name, text, self.call.id)], None
        elif self.mode == "required":
            calls = parse_required(text, self.plan.names)
            content = None if calls else text
        elif self.mode == "auto":
            content, calls = parse_hermes(text, self.plan.names)
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = [c.openai() for c in calls]
        return msg, self._finish(bool(calls), finish_reason)

    def _finish(self, called: bool, finish_reason: str | None) -> str | None:
        if self.mode == "named":  # the arguments are complete when their grammar is
            return "tool_calls" if finish_reason == "stop" else finish_reason
        return "tool_calls" if called else finish_reason

    # ---- streaming ----
    def first(self) -> dict[str, Any]:
        """The first delta (with the role)."""
        if self.mode == "named":
            head = self.call.openai(0)
            return {"role": "assistant", "content": None, "tool_calls": [head]}
        return {"role": "assistant", "content": None if self.mode == "required" else ""}

    def feed(self, text: str) -> Deltas:
        """Deltas for newly released text."""
        self.text += text
        if not text or self.mode == "required":
            return []
        if self.mode == "named":
            return [{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}]
        if self.mode == "none":
            return [{"content": text}]
        return self._release()

    def _release(self) -> Deltas:
        if self.held:
            return []
        start = self.text.find(CALL_OPEN, self.sent)
        if start != -1:
            self.held = True
            end = start
        else:
            end = len(self.text) - _open_tail(self.text[self.sent :])
        piece, self.sent = self.text[self.sent : end], max(self.sent, end)
        return [{"content": piece}] if piece else []

    def end(self, finish_reason: str | None) -> tuple[Deltas, str | None]:
        """The last deltas and the finish_reason, once the text is complete."""
        if self.mode in ("none", "named"):
            return [], self._finish(False, finish_reason)
        if self.mode == "required":
            calls = parse_required(self.text, self.plan.names)
            if calls:
                return [_calls_delta(calls)], "tool_calls"
            return ([{"content": self.text}] if self.text else []), finish_reason
        rest = self.text[self.sent :]
        self.sent = len(self.text)
        content, calls = parse_hermes(rest, self.plan.names)
        deltas: Deltas = [{"content": content}] if content else []
        if calls:
            deltas.append(_calls_delta(calls))
        return deltas, self._finish(bool(calls), finish_reason)
