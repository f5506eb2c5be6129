"""What the HTTP routes share: the JSON body, SSE framing, the prompt's encoding, the sampling
parameters (400 naming the parameter), and the submission of an OpenAI request's choices."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask

from dpattn.disaggregation.frontend import bootstrap_of
from dpattn.entrypoints.openai_protocol import (
    ApiError,
    CompletionRequest,
    bad,
    from_validation_error,
    usage,
)
from dpattn.entrypoints.serving import ServerState, Submission
from dpattn.entrypoints.structured import Constraint
from dpattn.executor.sampling_params import SamplingParams

DP_RANK_HEADER = "x-data-parallel-rank"
DONE = "data: [DONE]\n\n"


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def parse_body(request: Request, cls: type[BaseModel]) -> Any:
    """The JSON body as `cls`; malformed JSON, wrong types, unknown fields: 400."""
    try:
        data = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad("the JSON body must be an object", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None


def sampling_params(d: dict[str, Any] | None, param: str = "sampling_params") -> SamplingParams:
    try:
        return SamplingParams.from_dict(d)
    except (ValueError, TypeError) as e:
        raise bad(str(e), param) from None


def encode(st: ServerState, text: str, param: str = "prompt") -> list[int]:
    if st.tokenizer is None:
        raise bad("this model has no tokenizer: send token ids", param)
    return st.tokenizer.encode(text)


def streaming_response(sub: Submission, chunks: AsyncIterator[str]) -> StreamingResponse:
    """SSE response; whatever ends the stream (client gone included) aborts what still runs."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        except ApiError as e:  # the request timeout, mid-stream: the status is already sent
            yield sse(e.body())
            yield DONE
        finally:
            sub.close()

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
        background=BackgroundTask(sub.close),  # the body may never start if the client left
    )


# ---- the OpenAI routes (/v1/completions, /v1/chat/completions) ----
def openai_usage(sub: Submission, n: int) -> dict[str, Any]:
    firsts = [c for c in sub.choices if c.index % n == 0]  # once per prompt
    return usage(
        sum(c.prompt_tokens for c in firsts),
        sum(len(c.ids) for c in sub.choices),
        sum(c.cached_tokens for c in firsts),
    )


async def submit_openai(
    st: ServerState,
    request: Request,
    req: Any,
    prompts: list[list[int]],
    max_new: int | None,
    logprob: bool,
    top_logprobs_num: int = 0,
    logprob_start_len: int = -1,
    constraint: Constraint | None = None,
) -> tuple[Submission, dict[str, Any]]:
    """Checks that need the engine, then all choices of all prompts (prompt-major), each
    constrained by `constraint` where there is one."""
    st.check_model(req.model)
    rank = st.dp_rank(request.headers.get(DP_RANK_HEADER), req.dp_rank)
    param = "prompt" if isinstance(req, CompletionRequest) else "messages"
    grammar = constraint.fields() if constraint is not None else {}
    items = []
    for ids in prompts:
        st.check_ids(ids, param)
        # chat default: up to the context
        new = max_new if max_new is not None else st.context_length - len(ids)
        st.check_length(len(ids), new, param)
        items += [
            (ids, sampling_params({**req.sampling_dict(new, j), **grammar}, param), rank)
            for j in range(req.n)
        ]
    sub = Submission(st)
    sub.untrimmed = set(range(len(items))) if req.no_stop_trim else set()
    if constraint is not None:
        sub.grammar_params = dict.fromkeys(range(len(items)), constraint.param)
    boot = bootstrap_of(req, len(prompts))
    await sub.start(items, logprob, top_logprobs_num, logprob_start_len, boot)
    return sub, dict(created=int(time.time()), model=st.model_name)


async def finish_openai(sub: Submission, request: Request) -> Response | None:
    """Wait for every choice (non-streaming): a 499 if the client left, the failure if any."""
    if not await sub.collect(request.receive):
        return Response(status_code=499)  # client closed the request: nobody reads this
    if (err := sub.failure()) is not None:
        raise err
    return None
