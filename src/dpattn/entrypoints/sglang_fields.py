"""SGLang's extension fields: the one table of the request keys SGLang's schemas define beyond
dpattn's own (ChatCompletionRequest, CompletionRequest, GenerateReqInput and its
`sampling_params`), and what dpattn does with each.

sglang-router and SGLang's clients send these keys, most of them at their defaults, so a worker
that answered them with "unknown parameter" would fail every request. Each key is accepted with
the JSON type SGLang gives it and:
- honoured, where dpattn can do what it asks (`no_stop_trim`, `continue_final_message`, ...);
- a no-op, where every value asks for nothing dpattn lacks (`log_metrics`, `stream_reasoning`
  without a reasoning parser, ...);
- or accepted only at the values listed, any other value refused with a 400 that names the
  field (`return_hidden_states: true`, a `lora_path`, a `structural_tag`, ...), never silently
  ignored.
Keys in no schema stay an error. The PD router's `bootstrap_*` keys are not here
(disaggregation/). /generate's `sampling_params` are parsed here too, with SGLang's names and
defaults (max_new_tokens 128).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from dpattn.entrypoints.errors import ApiError, bad, from_validation_error, unsupported
from dpattn.entrypoints.structured import sampling_constraint

MAX_N = 16  # choices / outputs per prompt (OpenAI allows more; each is a full engine request)
MAX_SEED = 2**63


@dataclass(frozen=True)
class Ext:
    kinds: str  # c: /v1/chat/completions, p: /v1/completions, g: /generate, s: its sampling_params
    type: Any  # the JSON type SGLang gives the key
    default: Any  # SGLang's default (always accepted)
    accepted: tuple[Any, ...] | None  # None: every value; else the only values accepted
    effect: str  # what dpattn does with it (the refusal's reason, for a refused value)


ANY = None
STRUCTURED = "constrained decoding (structured.py): the output follows "
RANK = "synonym of dp_rank (both given: they must agree)"

# fmt: off
EXTENSIONS: dict[str, Ext] = {
    # -- honoured --
    "no_stop_trim": Ext("cps", bool, False, ANY, "honoured: the matched stop string stays in the text"),
    "continue_final_message": Ext("c", bool, False, ANY, "honoured: a last assistant message is continued, not closed"),
    "chat_template_kwargs": Ext("c", dict[str, Any] | None, None, ANY, "honoured: extra variables for the chat template"),
    "rid": Ext("cpg", str | list[str] | None, None, ANY, "honoured: the response's id (/generate: meta_info.id, a list: one per output)"),
    "data_parallel_rank": Ext("cpg", int | list[int] | None, None, ANY, "honoured: " + RANK),
    "routed_dp_rank": Ext("cpg", int | list[int] | None, None, ANY, "honoured: " + RANK),
    "sampling_seed": Ext("cps", int | None, None, ANY, "honoured: synonym of seed"),
    "return_text_in_logprobs": Ext("g", bool, False, ANY, "honoured: logprob entries carry their token's text, else null"),
    "model": Ext("g", str | None, None, ANY, "honoured: checked against the served model (404), as on /v1"),
    "n": Ext("s", int, 1, ANY, "honoured: n outputs per prompt"),
    "regex": Ext("cps", str | None, None, ANY, "honoured: " + STRUCTURED + "the regular expression"),
    "ebnf": Ext("cps", str | None, None, ANY, "honoured: " + STRUCTURED + "the EBNF grammar"),
    "json_schema": Ext("ps", str | None, None, ANY, "honoured: " + STRUCTURED + "the JSON schema (a string of JSON)"),
    "response_format": Ext("p", dict[str, Any] | None, None, ANY, "honoured: " + STRUCTURED + "response_format, as on chat"),
    # -- no-ops: every value asks for nothing dpattn lacks --
    "separate_reasoning": Ext("c", bool, True, ANY, "no-op: no reasoning parser, no reasoning text to separate"),
    "stream_reasoning": Ext("c", bool, True, ANY, "no-op: no reasoning parser, no reasoning text to stream"),
    "log_metrics": Ext("g", bool, True, ANY, "no-op: the request is counted in /metrics either way"),
    "no_logs": Ext("g", bool, False, ANY, "no-op: dpattn never logs request contents"),
    "stream_interval": Ext("s", int | None, None, ANY, "no-op: every step's new text is streamed"),
    # -- accepted only at the values listed; any other value: 400 naming the field --
    "return_hidden_states": Ext("cpg", bool | str, False, (False,), "hidden states are not returned"),
    "lora_path": Ext("cpg", str | list[str | None] | None, None, (None,), "LoRA adapters are not supported"),
    "lora_id": Ext("g", str | None, None, (None,), "LoRA adapters are not supported"),
    "session_params": Ext("cpg", dict[str, Any] | None, None, (None,), "sessions are not supported"),
    "structural_tag": Ext("s", str | None, None, (None,), "structural tags are not supported (json_schema, regex and ebnf are)"),
    "stop_regex": Ext("cps", str | list[str] | None, None, (None,), "regex stop conditions are not supported"),
    "min_tokens": Ext("cp", int | None, 0, (0, None), "a minimum output length is not supported"),
    "min_new_tokens": Ext("s", int | None, 0, (0, None), "a minimum output length is not supported"),
    "frequency_penalty": Ext("s", float | None, 0.0, (0, None), "penalties are not supported (only 0)"),
    "presence_penalty": Ext("s", float | None, 0.0, (0, None), "penalties are not supported (only 0)"),
    "repetition_penalty": Ext("s", float | None, 1.0, (1, None), "penalties are not supported (only 1)"),
    "spaces_between_special_tokens": Ext("s", bool | None, True, (True, None), "special tokens are decoded as the tokenizer joins them"),
    "custom_logit_processor": Ext("cpg", str | list[str | None] | None, None, (None,), "custom logit processors are not supported"),
    "custom_params": Ext("cps", dict[str, Any] | None, None, (None,), "custom logit processors are not supported"),
    "extra_key": Ext("cpg", str | list[str] | None, None, (None,), "the prefix cache has no per-key namespaces"),
    "cache_salt": Ext("cpg", str | list[str] | None, None, (None,), "the prefix cache has no per-salt namespaces"),
    "priority": Ext("cpg", int | None, None, (None,), "there is no priority scheduling"),
    "custom_labels": Ext("cpg", dict[str, str] | None, None, (None,), "metrics have no custom labels"),
    "reasoning_effort": Ext("c", str | float | None, None, (None,), "there is no reasoning control"),
    "token_ids_logprob": Ext("g", list[int] | None, None, (None,), "logprobs of chosen token ids are not supported"),
    "background": Ext("g", bool, False, (False,), "background requests are not supported"),
    "return_entropy": Ext("g", bool, False, (False,), "entropy is not returned"),
    "return_bytes": Ext("g", bool, False, (False,), "image bytes are not returned (no image generation)"),
    "image_data": Ext("g", Any, None, (None,), "text models only"),
    "video_data": Ext("g", Any, None, (None,), "text models only"),
    "audio_data": Ext("g", Any, None, (None,), "text models only"),
    "input_embeds": Ext("g", Any, None, (None,), "prompts are token ids or text"),
    "modalities": Ext("cg", list[str] | None, None, (None,), "text models only"),
    "max_dynamic_patch": Ext("c", int | None, None, (None,), "text models only"),
    "min_dynamic_patch": Ext("c", int | None, None, (None,), "text models only"),
    "use_audio_in_video": Ext("c", bool, False, (False,), "text models only"),
    "conversation_id": Ext("g", str | None, None, (None,), "conversations are not stored"),
}
# fmt: on


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _extensions(name: str, kind: str, base: type[BaseModel] = _Base) -> type[BaseModel]:
    fields: dict[str, Any] = {
        k: (e.type, e.default) for k, e in EXTENSIONS.items() if kind in e.kinds
    }
    return create_model(name, __base__=base, **fields)


# Mixins of the request models (openai_protocol.py): the table's keys, typed.
ChatExtensions = _extensions("ChatExtensions", "c")
CompletionExtensions = _extensions("CompletionExtensions", "p")
GenerateExtensions = _extensions("GenerateExtensions", "g")


class _SamplingCore(_Base):
    """/generate's sampling_params that dpattn's SamplingParams has, SGLang's defaults; null
    means the default (max_new_tokens null: up to the context)."""

    max_new_tokens: int | None = 128
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = -1
    min_p: float | None = 0.0
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    logit_bias: dict[str, float] | None = None  # token id (a JSON key) -> bias
    seed: int | None = None  # dpattn's name; SGLang's is sampling_seed


GenerateSamplingParams = _extensions("GenerateSamplingParams", "s", _SamplingCore)
CORE_SAMPLING = tuple(_SamplingCore.model_fields)


def _prefixed(err: ApiError, prefix: str) -> ApiError:
    if prefix:
        err.param = f"{prefix}.{err.param}" if err.param else prefix
    return err


def _synonym(req: Any, target: str, names: tuple[str, ...], prefix: str) -> None:
    """Fold `names` into `target`: every one given must agree."""
    given = [(n, getattr(req, n)) for n in (target, *names) if getattr(req, n) is not None]
    if len({repr(v) for _, v in given}) > 1:
        which = " and ".join(n for n, _ in given)
        raise _prefixed(bad(f"{which} disagree: give one, or equal values", given[1][0]), prefix)
    if given:
        setattr(req, target, given[0][1])


def apply_extensions(req: Any, kind: str, prefix: str = "") -> None:
    """Refuse a value dpattn does not do (400 naming the field), fold the synonyms in (dp_rank,
    seed); the honoured keys stay on `req` for the route."""
    for name, ext in EXTENSIONS.items():
        if kind not in ext.kinds or ext.accepted is None:
            continue
        value = getattr(req, name)  # strict types: no bool reaches a number field, nor back
        if not any(value == a for a in ext.accepted):
            allowed = ", ".join(json.dumps(a) for a in ext.accepted)
            why = f"is not supported by this server (only {allowed}): {ext.effect}"
            raise _prefixed(unsupported(name, why), prefix)
    if kind in "cpg":
        _synonym(req, "dp_rank", ("data_parallel_rank", "routed_dp_rank"), prefix)
        if kind != "g" and isinstance(req.dp_rank, list):
            raise bad("a list of DP ranks is for /generate batches", "data_parallel_rank")
        if kind != "g" and isinstance(req.rid, list):
            raise bad("'rid' must be one string here (a list is for /generate batches)", "rid")
    if kind in "cps":
        _synonym(req, "seed", ("sampling_seed",), prefix)


@dataclass
class GenerateSampling:
    """One /generate sampling_params dict, parsed: SamplingParams fields (no max_new_tokens when
    null: the route gives the rest of the context), n, no_stop_trim, and the parameter its
    grammar came from (json_schema / regex / ebnf; what a grammar error names)."""

    fields: dict[str, Any]
    max_new_tokens: int | None
    n: int
    no_stop_trim: bool
    grammar_param: str | None = None


def generate_sampling(d: Any, param: str = "sampling_params") -> GenerateSampling:
    try:
        sp: Any = GenerateSamplingParams.model_validate({} if d is None else d)
    except ValidationError as e:
        raise _prefixed(from_validation_error(e), param) from None
    apply_extensions(sp, "s", param)
    if not 1 <= sp.n <= MAX_N:
        raise bad(f"'n' must be between 1 and {MAX_N}", f"{param}.n")
    fields = {k: getattr(sp, k) for k in CORE_SAMPLING if getattr(sp, k) is not None}
    fields.pop("max_new_tokens", None)
    if sp.logit_bias is not None:
        if not all(k.lstrip("-").isdigit() for k in sp.logit_bias):
            raise bad("'logit_bias' keys must be token ids", f"{param}.logit_bias")
        fields["logit_bias"] = {int(k): v for k, v in sp.logit_bias.items()}
    grammar = sampling_constraint(sp, param)
    if grammar is not None:
        fields |= grammar.fields()
    where = grammar.param if grammar is not None else None
    return GenerateSampling(fields, sp.max_new_tokens, sp.n, sp.no_stop_trim, where)


def seeded(fields: dict[str, Any], copy: int) -> dict[str, Any]:
    """Output `copy` of a prompt's n: a seeded request gets seed + copy (as the OpenAI routes)."""
    if fields.get("seed") is None or copy == 0:
        return fields
    return {**fields, "seed": (fields["seed"] + copy) % MAX_SEED}
