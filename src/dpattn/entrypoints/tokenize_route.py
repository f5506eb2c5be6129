"""`POST /tokenize` and `POST /detokenize`, as vLLM and SGLang serve them.

/tokenize: `{"prompt": str}` (or `"text"`), optional `"add_special_tokens"` (default true) ->
`{"tokens": [ids], "count": n, "max_model_len": L}`. /detokenize: `{"tokens": [ids]}` ->
`{"prompt": text}`. Ids outside the model's vocabulary are a 400.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from pydantic import Field

from dpattn.entrypoints.http_common import parse_body
from dpattn.entrypoints.openai_protocol import _Strict, bad
from dpattn.entrypoints.serving import ServerState


class TokenizeRequest(_Strict):
    prompt: str | None = None
    text: str | None = None
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeRequest(_Strict):
    tokens: list[int] = Field(default_factory=list)
    model: str | None = None


def add_tokenize_routes(app: FastAPI, st: ServerState) -> None:
    def tokenizer() -> Any:
        if st.tokenizer is None:
            raise bad("this model has no tokenizer", "model")
        return st.tokenizer

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req: TokenizeRequest = await parse_body(request, TokenizeRequest)
        if (req.prompt is None) == (req.text is None):
            raise bad("give exactly one of 'prompt' or 'text'", "prompt")
        text = req.prompt if req.prompt is not None else req.text
        ids = tokenizer().encode(text, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": st.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req: DetokenizeRequest = await parse_body(request, DetokenizeRequest)
        if req.tokens:
            st.check_ids(req.tokens, "tokens")
        return {"prompt": tokenizer().decode(req.tokens)}
