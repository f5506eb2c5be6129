"""Structured outputs on the HTTP routes: `response_format`, SGLang's `regex` / `ebnf` /
`json_schema`, and the tool-derived schemas, mapped onto SamplingParams' grammar fields.

At most one constraint per request. A JSON schema is checked here (a JSON object, valid under
JSON Schema 2020-12) so that most mistakes are a 400 naming the parameter before anything
reaches a rank; regexes and EBNF are parsed by the grammar backend when the engine takes the
request (executor/grammar.py: `check_grammar`, a ValueError "<kind>: <reason>"), and the 400
then names the parameter the grammar came from (`Submission.grammar_params`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from dpattn.entrypoints.errors import bad
from dpattn.executor.sampling_params import GRAMMAR_KINDS

JSON_OBJECT = '{"type": "object"}'  # response_format json_object: any JSON object
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for schema and function names
RESPONSE_FORMAT_KEYS = {"name", "schema", "strict", "description"}


@dataclass(frozen=True)
class Constraint:
    """One request's grammar: its kind (a SamplingParams field), its text, and the request
    parameter it came from (what a 400 about it names)."""

    kind: str
    text: str
    param: str

    def fields(self) -> dict[str, str]:
        return {self.kind: self.text}


def grammar_error_param(err: Exception, param: str | None) -> str | None:
    """`param` if err is the grammar backend's complaint about a grammar ("<kind>: ..."), else
    None (another ValueError names no parameter of ours)."""
    if param is not None and str(err).startswith(tuple(f"{k}:" for k in GRAMMAR_KINDS)):
        return param
    return None


def check_schema(schema: Any, param: str) -> str:
    """A JSON schema given as an object, as the text SamplingParams carries; 400 naming
    `param` unless it is a valid JSON Schema (2020-12)."""
    if not isinstance(schema, dict):
        raise bad(f"'{param}' must be a JSON schema (a JSON object)", param)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        at = f" at '{where}'" if where else ""
        raise bad(f"'{param}' is not a valid JSON schema{at}: {e.message}", param) from None
    return grammar_schema(schema)


def grammar_schema(schema: dict[str, Any]) -> str:
    """The text SamplingParams carries for a (checked) JSON schema."""
    return json.dumps(schema, ensure_ascii=False)


def schema_text(text: Any, param: str) -> str:
    """SGLang's json_schema (a string of JSON), checked as check_schema checks an object."""
    if not isinstance(text, str) or not text:
        raise bad(f"'{param}' must be a non-empty string holding a JSON schema", param)
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise bad(f"'{param}' is not valid JSON: {e}", param) from None
    return check_schema(schema, param)


def _json_schema_format(spec: Any, param: str) -> str:
    """The schema of response_format {"type": "json_schema", "json_schema": spec}."""
    where = f"{param}.json_schema"
    if not isinstance(spec, dict):
        raise bad(f"'{where}' must be an object with 'name' and 'schema'", param)
    unknown = sorted(set(spec) - RESPONSE_FORMAT_KEYS)
    if unknown:
        raise bad(f"'{where}' has unknown key(s) {unknown}", param)
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise bad(f"'{where}.name' must match [a-zA-Z0-9_-]{{1,64}}, got {name!r}", param)
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise bad(f"'{where}.strict' must be true or false", param)
    if not isinstance(spec.get("description", ""), (str, type(None))):
        raise bad(f"'{where}.description' must be a string", param)
    if "schema" not in spec:
        raise bad(f"'{where}.schema' is required", param)
    return check_schema(spec["schema"], param)


def response_format(rf: Any, param: str = "response_format") -> Constraint | None:
    """OpenAI's response_format: text (no constraint), json_object (any JSON object), or
    json_schema (the schema it carries; `strict` or not, the output always follows it)."""
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise bad(f"'{param}' must be an object with a 'type'", param)
    kind = rf["type"]
    extra = sorted(set(rf) - {"type", "json_schema"})
    if extra or (kind != "json_schema" and "json_schema" in rf):
        raise bad(f"'{param}' has unknown key(s) {extra or ['json_schema']}", param)
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_schema", JSON_OBJECT, param)
    if kind == "json_schema":
        return Constraint("json_schema", _json_schema_format(rf.get("json_schema"), param), param)
    raise bad(
        f"'{param}.type' must be text, json_object or json_schema, got {kind!r}",
        param,
        "unsupported_parameter" if kind == "structural_tag" else "invalid_value",
    )


def one_constraint(*candidates: Constraint | None) -> Constraint | None:
    """The request's constraint; two or more: 400 naming the second."""
    given = [c for c in candidates if c is not None]
    if len(given) > 1:
        names = " and ".join(f"'{c.param}'" for c in given)
        raise bad(f"{names} each constrain the output: give at most one", given[1].param)
    return given[0] if given else None


def request_constraint(req: Any, *more: Constraint | None) -> Constraint | None:
    """An OpenAI request's constraint (chat or completions): response_format, SGLang's regex /
    ebnf / json_schema where the request has them, and `more` (the tools' schema)."""
    found = [response_format(getattr(req, "response_format", None))]
    for kind in ("regex", "ebnf"):
        text = getattr(req, kind, None)
        if text is not None:
            if not text:
                raise bad(f"'{kind}' must not be empty", kind)
            found.append(Constraint(kind, text, kind))
    schema = getattr(req, "json_schema", None)
    if schema is not None:
        found.append(Constraint("json_schema", schema_text(schema, "json_schema"), "json_schema"))
    return one_constraint(*found, *more)


def sampling_constraint(sp: Any, param: str) -> Constraint | None:
    """/generate's sampling_params grammar (json_schema, regex or ebnf), named
    `<param>.<kind>`; a json_schema is checked as a schema."""
    found = []
    for kind in GRAMMAR_KINDS:
        text = getattr(sp, kind, None)
        if text is None:
            continue
        where = f"{param}.{kind}"
        if kind == "json_schema":
            text = schema_text(text, where)
        elif not text:
            raise bad(f"'{where}' must not be empty", where)
        found.append(Constraint(kind, text, where))
    return one_constraint(*found)
