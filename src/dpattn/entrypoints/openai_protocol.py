"""OpenAI-compatible request models and their validation (the errors: errors.py).

Requests are validated strictly: an unknown field, a wrong JSON type or a parameter this engine
cannot honour (penalties, ...) is a 400
that names the parameter, never a silent approximation. SGLang's extension keys are accepted as
sglang_fields.py's table says (honoured, a no-op, or refused naming the field).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from dpattn.entrypoints.detokenizer import token_bytes, token_text
from dpattn.entrypoints.errors import ApiError as ApiError  # re-exported: the routes' import
from dpattn.entrypoints.errors import bad, unsupported
from dpattn.entrypoints.errors import from_validation_error as from_validation_error
from dpattn.entrypoints.sglang_fields import (
    MAX_N,
    ChatExtensions,
    CompletionExtensions,
    GenerateExtensions,
    apply_extensions,
)

MAX_STOP = 16
MAX_SEED = 2**63


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension
    min_p: float | None = None  # extension
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension
    ignore_eos: bool = False  # extension
    skip_special_tokens: bool = True  # extension (as vLLM / SGLang): False keeps them in text
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    dp_rank: int | None = None  # extension: pin the request's DP group
    # Prefill/decode disaggregation: set by the PD router (dpattn router --pd-disaggregation)
    bootstrap_host: str | list[str] | None = None
    bootstrap_port: int | list[int | None] | None = None  # null: the server's configured port
    bootstrap_room: int | list[int] | None = None  # lists: as SGLang's router sends them
    # accepted only at their neutral values
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def check_common(self) -> None:
        # 0 only scores a completions prompt (echo + logprobs); checked by the route
        if self.max_tokens is not None and self.max_tokens < 0:
            raise bad("'max_tokens' must be at least 1", "max_tokens")
        if not 1 <= self.n <= MAX_N:
            raise bad(f"'n' must be between 1 and {MAX_N}", "n")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise bad("'temperature' must be between 0 and 2", "temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise bad("'top_p' must be in (0, 1]", "top_p")
        if self.top_k is not None and self.top_k < -1:
            raise bad("'top_k' must be -1 (off), 0 (off) or >= 1", "top_k")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise bad("'min_p' must be in [0, 1]", "min_p")
        if self.seed is not None and not 0 <= self.seed < MAX_SEED:
            raise bad("'seed' must be in [0, 2**63)", "seed")
        if self.stop_token_ids is not None and any(t < 0 for t in self.stop_token_ids):
            raise bad("'stop_token_ids' must be token ids >= 0", "stop_token_ids")
        stops = self.stop_list()
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise bad(f"'stop' must be at most {MAX_STOP} non-empty strings", "stop")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise unsupported(name, "is not supported (only 0)")
        if self.repetition_penalty not in (None, 1):
            raise unsupported("repetition_penalty", "is not supported (only 1)")
        for key in self.logit_bias or {}:
            if not key.lstrip("-").isdigit():
                raise bad(f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias")

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_dict(self, max_new_tokens: int, choice: int) -> dict[str, Any]:
        """SamplingParams fields for choice `choice` (choice i of a seeded request: seed + i)."""
        d: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
        )
        if self.temperature is not None:
            d["temperature"] = self.temperature
        if self.top_p is not None:
            d["top_p"] = self.top_p
        if self.top_k is not None:
            d["top_k"] = -1 if self.top_k == 0 else self.top_k
        if self.min_p is not None:
            d["min_p"] = self.min_p
        if self.seed is not None:
            d["seed"] = (self.seed + choice) % MAX_SEED
        d["stop"] = self.stop_list()
        d["stop_token_ids"] = list(self.stop_token_ids or [])
        d["logit_bias"] = {int(k): v for k, v in (self.logit_bias or {}).items()}
        return d

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Common, CompletionExtensions):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        apply_extensions(self, "p")
        self.check_common()
        if isinstance(self.prompt, list) and (not self.prompt or [] in self.prompt):
            raise bad("'prompt' must not be empty", "prompt")
        if self.prompt == "":
            raise bad("'prompt' must not be empty", "prompt")
        if self.suffix is not None:
            raise unsupported("suffix")
        if self.best_of not in (None, 1, self.n):
            raise unsupported("best_of", "is not supported (only equal to n)")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise bad("'logprobs' must be between 0 and 20", "logprobs")


class ContentPart(_Strict):
    model_config = ConfigDict(extra="allow", strict=True)  # other part kinds: 400 in text()

    type: str
    text: str | None = None


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCallIn(_Strict):
    """A call in an assistant message of the history (a previous answer's tool_calls)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall

    def for_template(self) -> dict[str, Any]:
        # HF chat templates expect the arguments as a mapping (they serialise it themselves).
        try:
            args: Any = json.loads(self.function.arguments)
        except ValueError:
            args = self.function.arguments
        fn = {"name": self.function.name, "arguments": args}
        return {"id": self.id, "type": "function", "function": fn}


class ChatMessage(_Strict):
    # The roles chat templates know. content may be null only in an assistant turn that calls
    # tools; tool_call_id belongs to a tool message (the result of that call).
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def text(self, i: int) -> str:
        if self.content is None:
            if self.role != "assistant" or not self.tool_calls:
                raise bad(f"'messages.{i}.content' is required", f"messages.{i}.content")
            return ""
        if isinstance(self.content, str):
            return self.content
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise unsupported(
                    f"messages.{i}.content.{j}", "is not supported: only text parts are"
                )
        return "".join(p.text or "" for p in self.content)

    def for_template(self, i: int) -> dict[str, Any]:
        """The message as HF chat templates take it."""
        if self.tool_calls is not None and self.role != "assistant":
            raise bad("only assistant messages carry 'tool_calls'", f"messages.{i}.tool_calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise bad("only tool messages carry 'tool_call_id'", f"messages.{i}.tool_call_id")
        out: dict[str, Any] = {"role": self.role, "content": self.text(i)}
        if self.tool_calls:
            out["tool_calls"] = [c.for_template() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(_Common, ChatExtensions):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        apply_extensions(self, "c")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise bad("give 'max_tokens' or 'max_completion_tokens', not both", "max_tokens")
            self.max_tokens = self.max_completion_tokens
        self.check_common()
        if not self.messages:
            raise bad("'messages' must be a non-empty list", "messages")
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= 20:
                raise bad("'top_logprobs' must be between 0 and 20", "top_logprobs")
            if self.top_logprobs > 0 and not self.logprobs:
                raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        # tools, tool_choice and response_format: checked by the route (tool_calls.py,
        # structured.py), which turns them into the output's constraint

    def conversation(self) -> list[dict[str, Any]]:
        return [m.for_template(i) for i, m in enumerate(self.messages)]


class GenerateRequest(_Strict, GenerateExtensions):
    """The native /generate body: SGLang's GenerateReqInput (generate_route.py)."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0  # SGLang's names, as Engine.generate takes them
    logprob_start_len: int = -1
    dp_rank: int | list[int] | None = None
    stream: bool = False
    bootstrap_host: str | list[str] | None = None  # prefill/decode disaggregation (a router's)
    bootstrap_port: int | list[int | None] | None = None  # null: the server's configured port
    bootstrap_room: int | list[int] | None = None  # lists: as SGLang's router sends them


# ---- response pieces ----
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return dict(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details={"cached_tokens": cached_tokens},
    )


TopLogprobs = list[tuple[float, int]]  # (logprob, token id), best first


def completion_logprobs(
    tokenizer: Any,
    ids: list[int],
    logprobs: list[float | None],
    start: int,
    top: list[TopLogprobs | None] | None = None,
) -> tuple[dict[str, Any], int]:
    """Legacy completions `logprobs` (tokens, token_logprobs, top_logprobs as {token: logprob}
    per position, text_offset) and the next text offset. A None logprob (the prompt's first
    token under echo: nothing predicts it) has None alternatives too."""
    tokens = [token_text(tokenizer, t) for t in ids]
    offsets = []
    for tok in tokens:
        offsets.append(start)
        start += len(tok)
    tops = None
    if top is not None:
        tops = [
            None if alts is None else {token_text(tokenizer, t): lp for lp, t in alts}
            for alts in top
        ]
    body = dict(tokens=tokens, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets)
    return body, start


def chat_logprobs(
    tokenizer: Any, ids: list[int], logprobs: list[float], top: list[TopLogprobs] | None = None
) -> dict[str, Any]:
    def entry(t: int, lp: float) -> dict[str, Any]:
        return dict(token=token_text(tokenizer, t), logprob=lp, bytes=token_bytes(tokenizer, t))

    alts = top or [[] for _ in ids]  # no alternatives asked: an empty list per token
    content = [
        {**entry(t, lp), "top_logprobs": [entry(at, alp) for alp, at in a]}
        for t, lp, a in zip(ids, logprobs, alts)
    ]
    return {"content": content}
