"""Find the extent of JSON values in text that may still be growing (a model's output, mid-stream).

Tool-call parsers need the raw text of a call's arguments as it arrives, so that streamed argument deltas
concatenate to exactly what the non-streamed response returns; a full parse of partial JSON (as vLLM's
partial_json_parser + diffing does) cannot promise that. These scanners only locate values; `json.loads`
validates complete ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

WS = " \t\r\n"


def skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in WS:
        i += 1
    return i


def value_end(s: str, i: int, final: bool = False) -> int | None:
    """Index just past the JSON value starting at s[i], or None if the text ends inside it.

    A bare scalar (number, true/false/null) running to the end of the text is complete only when `final`.
    Structure is not validated beyond bracket and string matching.
    """
    if i >= len(s):
        return None
    c = s[i]
    if c == '"':
        return _string_end(s, i)
    if c in "{[":
        depth = 0
        j = i
        while j < len(s):
            ch = s[j]
            if ch == '"':
                end = _string_end(s, j)
                if end is None:
                    return None
                j = end
                continue
            if ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(s) and s[j] not in ",}]" + WS:
        j += 1
    return j if j < len(s) or final else None


def _string_end(s: str, i: int) -> int | None:
    j = i + 1
    while j < len(s):
        if s[j] == "\\":
            j += 2
            continue
        if s[j] == '"':
            return j + 1
        j += 1
    return None


@dataclass
class ObjectScan:
    """Top-level fields of a (possibly partial) JSON object: key -> (value start, value end or None)."""

    fields: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    end: int | None = None  # just past the closing brace, once seen
    error: bool = False  # not a JSON object (it will not become one however the text grows)

    def string_field(self, s: str, key: str) -> str | None:
        """The decoded value of a complete string field."""
        span = self.fields.get(key)
        if span is None or span[1] is None:
            return None
        try:
            v = json.loads(s[span[0]:span[1]])
        except json.JSONDecodeError:
            return None
        return v if isinstance(v, str) else None


def scan_object(s: str, i: int, final: bool = False) -> ObjectScan:
    """Scan the object whose '{' is at s[i]."""
    out = ObjectScan()
    if i >= len(s) or s[i] != "{":
        out.error = i < len(s)
        return out
    j = skip_ws(s, i + 1)
    if j < len(s) and s[j] == "}":
        out.end = j + 1
        return out
    while j < len(s):
        if s[j] != '"':
            out.error = True
            return out
        key_end = _string_end(s, j)
        if key_end is None:
            return out
        try:
            key = json.loads(s[j:key_end])
        except json.JSONDecodeError:
            out.error = True
            return out
        j = skip_ws(s, key_end)
        if j >= len(s):
            return out
        if s[j] != ":":
            out.error = True
            return out
        j = skip_ws(s, j + 1)
        if j >= len(s):
            return out
        vend = value_end(s, j, final)
        out.fields[key] = (j, vend)
        if vend is None:
            return out
        j = skip_ws(s, vend)
        if j >= len(s):
            return out
        if s[j] == "}":
            out.end = j + 1
            return out
        if s[j] != ",":
            out.error = True
            return out
        j = skip_ws(s, j + 1)
    return out
