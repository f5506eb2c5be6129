"""`POST /v1/chat/completions`: the conversation through the chat template, the output
constrained by `response_format` / SGLang's `regex` / `ebnf` or by the tools (structured.py,
tool_calls.py), the answer as messages or SSE chunks (tool calls: tool_stream.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from dpattn.entrypoints.chat_template import ChatTemplate
from dpattn.entrypoints.http_common import (
    DONE,
    finish_openai,
    openai_usage,
    parse_body,
    sse,
    streaming_response,
    submit_openai,
)
from dpattn.entrypoints.openai_protocol import ChatCompletionRequest, bad, chat_logprobs
from dpattn.entrypoints.serving import ServerState, Submission
from dpattn.entrypoints.structured import request_constraint
from dpattn.entrypoints.tool_calls import ToolPlan, tool_plan
from dpattn.entrypoints.tool_prompt import prompt_messages
from dpattn.entrypoints.tool_stream import ChoiceOutput


def _prompt(
    st: ServerState, template: ChatTemplate, req: ChatCompletionRequest, plan: ToolPlan
) -> list[int]:
    tok = st.tokenizer
    conv = req.conversation()  # a malformed message: 400 naming it
    messages, tools = prompt_messages(conv, plan, template.knows_tools)
    try:
        text = template.render(
            tok, messages, req.continue_final_message, req.chat_template_kwargs, tools
        )
    except Exception as e:  # noqa: BLE001 - a template error is the request's fault
        raise bad(f"the chat template failed on these messages: {e}", "messages") from None
    return tok.encode(text, add_special_tokens=False)


def add_chat_route(app: FastAPI, st: ServerState, template: ChatTemplate | None) -> None:
    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
        req.check()
        if st.tokenizer is None or template is None:
            raise bad(
                "this model has no chat template: start the server with --chat-template, "
                "or use /v1/completions with a prompt",
                "messages",
                "no_chat_template",
            )
        plan = tool_plan(req.tools, req.tool_choice, req.parallel_tool_calls)
        constraint = request_constraint(req, plan.constraint())
        ids = _prompt(st, template, req, plan)
        # The model's turn ends at the template's end-of-turn token, not only at its EOS.
        req.stop_token_ids = [*(req.stop_token_ids or []), *template.stop_token_ids(st.tokenizer)]
        top_n = (req.top_logprobs or 0) if req.logprobs else 0
        sub, meta = await submit_openai(
            st, request, req, [ids], req.max_tokens, req.logprobs, top_n, constraint=constraint
        )
        meta = {"id": req.rid or f"chatcmpl-{uuid.uuid4().hex}", **meta}
        outs = [ChoiceOutput(plan) for _ in sub.choices]
        if req.stream:
            return streaming_response(sub, _chunks(st, req, sub, meta, outs))
        if (resp := await finish_openai(sub, request)) is not None:
            return resp
        choices = []
        for c in sub.choices:
            message, finish_reason = outs[c.index].message(c.text, c.finish_reason)
            logprobs = None
            if req.logprobs:
                logprobs = chat_logprobs(st.tokenizer, c.ids, c.logprobs, c.top_logprobs)
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                }
            )
        usage = openai_usage(sub, req.n)
        body = {**meta, "object": "chat.completion", "choices": choices, "usage": usage}
        return JSONResponse(body)


async def _chunks(
    st: ServerState,
    req: ChatCompletionRequest,
    sub: Submission,
    meta: dict[str, Any],
    outs: list[ChoiceOutput],
) -> AsyncIterator[str]:
    base = {**meta, "object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict[str, Any], logprobs: Any, finish: str | None) -> str:
        ch = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**base, "choices": [ch]})

    for c in sub.choices:
        yield chunk(c.index, outs[c.index].first(), None, None)
    async for c, text, d in sub.events():
        if d.finish_reason in ("abort", "error"):
            yield sse(sub.failure().body())  # type: ignore[union-attr]
            break
        out = outs[c.index]
        deltas = out.feed(text)
        finish = None
        if d.finish_reason is not None:
            more, finish = out.end(d.finish_reason)
            deltas += more
        logprobs = None
        if req.logprobs and d.new_ids:
            logprobs = chat_logprobs(st.tokenizer, d.new_ids, d.new_logprobs, d.new_top_logprobs)
        if not deltas and (finish or logprobs):
            deltas = [{}]
        for k, delta in enumerate(deltas):  # logprobs with the first, finish with the last
            last = k == len(deltas) - 1
            yield chunk(c.index, delta, logprobs if k == 0 else None, finish if last else None)
    else:
        if req.include_usage:
            yield sse({**base, "choices": [], "usage": openai_usage(sub, req.n)})
    yield DONE
