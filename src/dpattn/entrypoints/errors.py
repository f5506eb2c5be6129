"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status,
and the 400 that names the parameter a pydantic validation error points at."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


def unsupported(param: str, why: str = "is not supported by this server") -> ApiError:
    return ApiError(400, f"'{param}' {why}", param, "unsupported_parameter")


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def from_validation_error(err: ValidationError) -> ApiError:
    """The first pydantic error as a 400 naming the offending parameter."""
    e = err.errors()[0]
    parts = [
        str(p)
        for p in e["loc"]
        if isinstance(p, int) or not ("[" in p or "(" in p or p.lower() in _TYPE_TAGS)
    ]
    param = ".".join(parts) or None
    kind = e["type"]
    if kind == "extra_forbidden":
        return unsupported(param or "?", "is not a supported parameter")
    if kind == "missing":
        return bad(f"'{param}' is required", param, "missing_required_parameter")
    code = "invalid_type" if kind.endswith("_type") else "invalid_value"
    tag = next((i for i, p in enumerate(e["loc"]) if str(p) not in parts), None)
    alternatives = [  # a union field: pydantic reports one error per member type
        str(x["loc"][tag])
        for x in err.errors()
        if tag is not None and len(x["loc"]) > tag and x["loc"][:tag] == e["loc"][:tag]
    ]
    if len(alternatives) > 1:
        expected = ", ".join(dict.fromkeys(alternatives))
        return bad(f"invalid type for '{param}': expected one of {expected}", param, code)
    return bad(f"invalid value for '{param}': {e['msg']}", param, code)
