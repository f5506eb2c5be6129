"""The native `POST /generate` route: Engine.generate over HTTP.

Body: `text` (str or list) or `input_ids` (list or list of lists), `sampling_params` (dict or
one per prompt; SamplingParams names), `return_logprob`, `dp_rank` (int or one per prompt; or the
X-Data-Parallel-Rank header), `stream` (single prompt only). The answer is what Engine.generate
returns: `{"text", "output_ids", "meta_info"}` or a list of them. A streamed answer is SSE events
of the same shape carrying only the new text and ids, then `data: [DONE]`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from dpattn.disaggregation.frontend import bootstrap_of
from dpattn.entrypoints.openai_protocol import GenerateRequest, bad
from dpattn.entrypoints.request_state import Delta, logprob_meta
from dpattn.entrypoints.serving import (
    DONE,
    DP_RANK_HEADER,
    Choice,
    ServerState,
    Submission,
    encode,
    parse_body,
    sampling_params,
    sse,
    streaming_response,
)


def _result(
    c: Choice,
    text: str,
    ids: list[int],
    req: GenerateRequest,
    prompt: list[int],
    delta: Delta | None = None,
) -> dict[str, Any]:
    """One answer, or one streamed event (`delta`: just its new tokens and logprobs)."""
    meta: dict[str, Any] = dict(
        id=c.rid,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=len(c.ids),
        finish_reason=c.finish_reason,
        matched_stop=c.matched_stop,
        dp_rank=c.dp_rank,
        cached_tokens=c.cached_tokens,
    )
    start = req.logprob_start_len
    if delta is None:
        lp = logprob_meta(
            ids, c.logprobs, c.top_logprobs, prompt, start, c.input_logprobs, c.input_top_logprobs
        )
    else:  # a streamed event carries the prompt's logprobs once, in the event that has them
        lp = logprob_meta(
            ids,
            delta.new_logprobs,
            delta.new_top_logprobs,
            prompt,
            start if delta.input_logprobs else -1,
            delta.input_logprobs,
            delta.input_top_logprobs,
        )
    return {"text": text, "output_ids": ids, "meta_info": meta | _lists(lp)}


def _lists(meta: dict[str, Any]) -> dict[str, Any]:
    """JSON arrays for the (logprob, id) pairs, as SGLang sends them."""
    pairs = {"output_token_logprobs", "input_token_logprobs"}
    return {k: [list(x) for x in v] if k in pairs else v for k, v in meta.items()}


def add_generate_route(app: FastAPI, st: ServerState) -> None:
    @app.post("/generate")
    async def generate(request: Request) -> Response:
        req: GenerateRequest = await parse_body(request, GenerateRequest)
        if (req.text is None) == (req.input_ids is None):
            raise bad("give exactly one of text or input_ids", "text")
        single = isinstance(req.text, str) or bool(
            req.input_ids and isinstance(req.input_ids[0], int)
        )
        batch: list[Any]
        if req.text is not None:
            texts = [req.text] if isinstance(req.text, str) else req.text
            batch = [encode(st, t, "text") for t in texts]
        else:
            batch = [req.input_ids] if single else list(req.input_ids or [])
        n = len(batch)
        if n == 0:
            raise bad("the batch is empty", "input_ids")
        for ids in batch:
            st.check_ids(ids, "input_ids" if req.text is None else "text")
        sps = req.sampling_params
        sps = sps if isinstance(sps, list) else [sps] * n
        ranks = req.dp_rank if isinstance(req.dp_rank, list) else [req.dp_rank] * n
        if len(sps) != n or len(ranks) != n:
            raise bad("sampling_params and dp_rank lists must match the batch", "sampling_params")
        header = request.headers.get(DP_RANK_HEADER)
        ranks = [st.dp_rank(header, r) for r in ranks]
        params = [sampling_params(s) for s in sps]
        if req.stream and not single:
            raise bad("stream is supported for a single request only", "stream")
        sub = Submission(st)
        items = list(zip(batch, params, ranks))
        lp = (req.return_logprob, req.top_logprobs_num, req.logprob_start_len)
        await sub.start(items, *lp, bootstrap_of(req))

        if req.stream:

            async def chunks() -> AsyncIterator[str]:
                async for c, text, d in sub.events():
                    if d.finish_reason == "error":
                        yield sse(sub.failure().body())  # type: ignore[union-attr]
                        break
                    yield sse(_result(c, text, d.new_ids, req, batch[0], d))
                yield DONE

            return streaming_response(sub, chunks())
        if not await sub.collect(request.receive):
            return Response(status_code=499)  # the client went away: nobody reads this
        if any(c.finish_reason == "error" for c in sub.choices):
            raise sub.failure()  # type: ignore[misc]
        outs = [_result(c, c.text, c.ids, req, batch[c.index]) for c in sub.choices]
        return JSONResponse(outs[0] if single else outs)
