"""Turning pydantic's ValidationError into one RuleError that names the file and the field.

Kept apart from the rule models because it is about wording, not about what
a rule may say: dotted field paths (``resize.width``, ``match[2]``), plain
words for pydantic's messages, and the keys a table allows when it meets an
unknown one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from service.errors import RuleError


class FieldError(ValueError):
    """A validator's complaint about a field other than the one it runs on."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")


def rule_error(exc: ValidationError, file: str, *, model: type[BaseModel]) -> RuleError:
    """One RuleError for all problems of a file; ``field`` is the first one's dotted path.

    ``model`` is the model that was validated, to list the keys a table allows.
    """
    (field, text), *others = [_describe(error, model) for error in exc.errors()]
    message = "; ".join([text, *(f"{other}: {more}" for other, more in others)])
    return RuleError(message, file=file, field=field)


_WORDING = (
    ("Input should be", "expected"),
    ("a valid tuple", "an array"),
    ("a valid integer", "an integer"),
    ("a valid number", "a number"),
    ("a valid boolean", "true or false"),
    ("a valid string", "a string"),
    ("less than or equal to", "at most"),
    ("greater than or equal to", "at least"),
)


def _describe(error: Mapping[str, Any], model: type[BaseModel]) -> tuple[str, str]:
    loc = [str(part) if isinstance(part, str) else f"[{part}]" for part in error["loc"]]
    field = ".".join(loc).replace(".[", "[")
    kind = error["type"]
    if kind == "value_error":
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, FieldError):
            inner, _, text = str(cause).partition(": ")
            if inner.startswith("["):
                return field + inner, text
            return (f"{field}.{inner}" if field else inner), text
        return field, str(cause)
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, error["loc"][:-1])
        return field, f"unknown key; expected one of: {', '.join(allowed)}"
    message = str(error["msg"])
    for before, after in _WORDING:
        message = message.replace(before, after)
    given = error.get("input")
    shown = "a table" if isinstance(given, dict) else f"{type(given).__name__} {given!r}"
    return field, f"{message}, got {shown}"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)
