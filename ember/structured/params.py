"""What a request asks to constrain its output to, with vLLM's `structured_outputs` names, and its errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar")


class StructuredOutputError(ValueError):
    """A constraint that cannot be compiled: invalid, or using a feature the grammar engine does not support.

    `kind` is the constraint's kind (one of KINDS, or "tool"); `problem` is the engine's own words; `param`, when
    set, names the request field at fault (the server reports it in its 400 error).
    """

    def __init__(self, kind: str, problem: str, param: str | None = None) -> None:
        super().__init__(f"invalid {kind} constraint: {problem}")
        self.kind = kind
        self.problem = problem
        self.param = param


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one of the constraint fields is set.

    json: a JSON schema (a dict, or its JSON text). json_object: any JSON object. regex: the whole output matches.
    choice: the output is exactly one of these strings. grammar: a Lark grammar, or a GBNF/EBNF one (`root ::=`).
    disable_any_whitespace: JSON only; True (ember's default, unlike vLLM's) allows no free whitespace between
    JSON tokens, only the ", " and ": " separators: small models otherwise tend to emit newlines without end.
    """

    json: dict[str, Any] | str | bool | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = True

    def __post_init__(self) -> None:
        set_kinds = [k for k in KINDS if self._is_set(k)]
        if len(set_kinds) != 1:
            raise StructuredOutputError(
                "structured_outputs", "exactly one of json, json_object, regex, choice, grammar must be given"
                + (f" (got {', '.join(set_kinds)})" if set_kinds else ""))
        kind = set_kinds[0]
        value = getattr(self, kind)
        if kind in ("regex", "grammar") and (not isinstance(value, str) or not value):
            raise StructuredOutputError(kind, f"{kind} must be a non-empty string")
        if kind == "choice" and (not isinstance(value, list) or not value
                                 or not all(isinstance(c, str) and c for c in value)):
            raise StructuredOutputError(kind, "choice must be a non-empty list of non-empty strings")
        if kind == "json" and not isinstance(value, dict | str | bool):
            raise StructuredOutputError(kind, f"a JSON schema must be an object, got {type(value).__name__}")

    def _is_set(self, kind: str) -> bool:
        value = getattr(self, kind)
        # json_object=False means "not this kind"; json=False is the schema `false` (an error, reported later).
        return bool(value) if kind == "json_object" else value is not None

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if self._is_set(k))

    def cache_key(self) -> tuple[str, str, bool]:
        """(kind, canonical spec text, whitespace option): equal keys compile to the same grammar."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json" and isinstance(value, str):
            try:  # the same schema written with other spacing shares one entry
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise StructuredOutputError("json", f"the schema is not valid JSON: {e}") from None
        # Key order is kept: llguidance emits properties in schema order, which clients choose on purpose.
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        return kind, text, self.disable_any_whitespace
