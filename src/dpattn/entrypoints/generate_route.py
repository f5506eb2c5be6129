"""The native `POST /generate` route, as SGLang serves it.

Body (SGLang's GenerateReqInput): `text` (str or list) or `input_ids` (list or list of lists),
`sampling_params` (a dict, or one per prompt) with SGLang's names and defaults (max_new_tokens
128, null: up to the context; temperature 1.0, top_p, top_k, min_p, stop, stop_token_ids,
ignore_eos, skip_special_tokens, logit_bias, sampling_seed / seed, n outputs per prompt, one of
json_schema / regex / ebnf to constrain the output; sglang_fields.py), `return_logprob`,
`top_logprobs_num`, `logprob_start_len`, `return_text_in_logprobs`, `rid`, `stream`, `dp_rank` /
`data_parallel_rank` (int or one per prompt; or the X-Data-Parallel-Rank header), `model`, and
the extension keys of sglang_fields.py.

The answer: `{"text", "output_ids", "meta_info"}` for one prompt with n = 1, else a list of them,
prompt-major (prompt i's outputs at i * n .. i * n + n - 1). meta_info: `id` (the request's rid,
else the engine's), `finish_reason` (`{"type": "stop", "matched": token id or stop string}`,
`{"type": "length", "length": tokens}`, `{"type": "abort", "message": why}`; null while
running), `prompt_tokens`, `completion_tokens`, `cached_tokens`, `e2e_latency` (seconds since
the request arrived), `dp_rank`, and with return_logprob `output_token_logprobs` /
`input_token_logprobs` as [logprob, token id, token text or null] (text with
return_text_in_logprobs) and, with top_logprobs_num, `output_top_logprobs` /
`input_top_logprobs` (a list of such entries per position). A grammar the ranks could not
compile answers a 400 (an error event when streamed), as SGLang does.

Streamed (`stream: true`, any batch): SSE events of the same shape whose `text`, `output_ids` and
logprobs are cumulative: each event's text extends the one before, and the last event equals the
unstreamed answer. Events carry `index` (the output's place in the list) when the answer is a
list; then `data: [DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from dpattn.disaggregation.frontend import bootstrap_of
from dpattn.entrypoints.detokenizer import token_text
from dpattn.entrypoints.http_common import (
    DONE,
    DP_RANK_HEADER,
    encode,
    parse_body,
    sampling_params,
    sse,
    streaming_response,
)
from dpattn.entrypoints.openai_protocol import GenerateRequest, bad
from dpattn.entrypoints.request_state import logprob_meta
from dpattn.entrypoints.serving import Choice, ServerState, Submission
from dpattn.entrypoints.sglang_fields import apply_extensions, generate_sampling, seeded

LOGPROB_KEYS = ("output_token_logprobs", "input_token_logprobs")
TOP_KEYS = ("output_top_logprobs", "input_top_logprobs")


def finish_reason(c: Choice) -> dict[str, Any] | None:
    """SGLang's finish reason object."""
    if c.finish_reason is None:
        return None
    if c.finish_reason == "length":
        return {"type": "length", "length": len(c.ids)}
    if c.finish_reason == "stop":
        return {"type": "stop", "matched": c.matched_stop}
    return {"type": "abort", "message": c.error or "the engine aborted the request"}


class _Outputs:
    """What one /generate request answers, per output (a Choice)."""

    def __init__(
        self,
        st: ServerState,
        req: GenerateRequest,
        prompts: list[list[int]],
        n: int,
        rids: list[str] | None,
        single: bool,
    ) -> None:
        self.st, self.req, self.prompts, self.n, self.rids = st, req, prompts, n, rids
        self.single = single  # one prompt, n = 1: one object, not a list

    def entry(self, lp: float | None, token: int) -> list[Any]:
        text = token_text(self.st.tokenizer, token) if self.req.return_text_in_logprobs else None
        return [lp, token, text]

    def logprobs(self, c: Choice) -> dict[str, Any]:
        req = self.req
        meta = logprob_meta(
            c.ids,
            c.logprobs,
            c.top_logprobs,
            self.prompts[c.index // self.n],
            req.logprob_start_len,
            c.input_logprobs,
            c.input_top_logprobs,
        )
        out: dict[str, Any] = {k: [self.entry(*x) for x in meta.get(k, [])] for k in LOGPROB_KEYS}
        if req.top_logprobs_num:
            for k in TOP_KEYS:
                out[k] = [
                    None if alts is None else [self.entry(*x) for x in alts]
                    for alts in meta.get(k, [])
                ]
        return out

    def result(self, c: Choice, streamed: bool = False) -> dict[str, Any]:
        end = c.t_last if c.finish_reason and c.t_last else time.perf_counter()
        meta: dict[str, Any] = dict(
            id=c.rid if self.rids is None else self.rids[c.index],
            finish_reason=finish_reason(c),
            prompt_tokens=c.prompt_tokens,
            completion_tokens=len(c.ids),
            cached_tokens=c.cached_tokens,
            e2e_latency=end - c.t_start,
            dp_rank=c.dp_rank,
        )
        if self.req.return_logprob:
            meta |= self.logprobs(c)
        out = {"text": c.text, "output_ids": list(c.ids), "meta_info": meta}
        if streamed and not self.single:
            out["index"] = c.index
        return out


def _rids(rid: str | list[str] | None, outputs: int) -> list[str] | None:
    if rid is None:
        return None
    rids = [rid] if isinstance(rid, str) else rid
    if len(rids) != outputs:
        raise bad(f"'rid' must have one id per output ({outputs})", "rid")
    return rids


def add_generate_route(app: FastAPI, st: ServerState) -> None:
    @app.post("/generate")
    async def generate(request: Request) -> Response:
        req: GenerateRequest = await parse_body(request, GenerateRequest)
        apply_extensions(req, "g")
        st.check_model(req.model)
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
        if not batch:
            raise bad("the batch is empty", "input_ids")
        for ids in batch:
            st.check_ids(ids, "input_ids" if req.text is None else "text")
        sps = req.sampling_params
        sps = sps if isinstance(sps, list) else [sps] * len(batch)
        ranks = req.dp_rank if isinstance(req.dp_rank, list) else [req.dp_rank] * len(batch)
        if len(sps) != len(batch) or len(ranks) != len(batch):
            raise bad("sampling_params and dp_rank lists must match the batch", "sampling_params")
        header = request.headers.get(DP_RANK_HEADER)
        ranks = [st.dp_rank(header, r) for r in ranks]
        param = None if isinstance(req.sampling_params, list) else "sampling_params"
        parsed = [generate_sampling(s, param or f"sampling_params.{i}") for i, s in enumerate(sps)]
        n = parsed[0].n
        if any(p.n != n for p in parsed):
            raise bad("every prompt's sampling_params must have the same n", "sampling_params")
        sub = Submission(st)
        items = []
        for i, (ids, p, rank) in enumerate(zip(batch, parsed, ranks)):
            new = st.context_length - len(ids) if p.max_new_tokens is None else p.max_new_tokens
            for j in range(n):
                fields = {**seeded(p.fields, j), "max_new_tokens": new}
                if p.no_stop_trim:
                    sub.untrimmed.add(len(items))
                if p.grammar_param is not None:
                    sub.grammar_params[len(items)] = p.grammar_param
                items.append((ids, sampling_params(fields, param or f"sampling_params.{i}"), rank))
        rids = _rids(req.rid, len(items))
        outputs = _Outputs(st, req, batch, n, rids, single and n == 1)
        lp = (req.return_logprob, req.top_logprobs_num, req.logprob_start_len)
        await sub.start(items, *lp, bootstrap_of(req, len(batch)))

        if req.stream:

            async def chunks() -> AsyncIterator[str]:
                async for c, _, d in sub.events():
                    if d.finish_reason == "error" or d.error_status:  # failed, or a 400
                        yield sse(sub.failure().body())  # type: ignore[union-attr]
                        break
                    if d.new_ids or d.finish_reason or d.input_logprobs:
                        yield sse(outputs.result(c, streamed=True))
                yield DONE

            return streaming_response(sub, chunks())
        if not await sub.collect(request.receive):
            return Response(status_code=499)  # the client went away: nobody reads this
        if any(c.finish_reason == "error" or c.error_status for c in sub.choices):
            raise sub.failure()  # type: ignore[misc]
        outs = [outputs.result(c) for c in sub.choices]
        return JSONResponse(outs[0] if outputs.single else outs)
