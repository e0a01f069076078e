"""Tool calls in model output: Hermes `<tool_call>{...}</tool_call>`, Llama 3.1 JSON, and the forced formats.

Every parser is one streaming state machine; the non-streamed `extract` feeds it the whole text. So streamed
deltas (name first, then raw argument text as it grows) always reassemble to the non-streamed result. Arguments
are the model's own JSON text for the value (a JSON string value is decoded: some models stringify arguments).

    parser = get_tool_parser("hermes")
    parser.extract(text)              -> ExtractedToolCalls(content, tool_calls)
    s = parser.streamer(); s.feed(delta) ... s.finish()   -> StreamDelta(content, tool_calls: [ToolCallDelta])
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from ember.structured.json_scan import WS, ObjectScan, scan_object, skip_ws


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=new_call_id)


@dataclass
class ToolCallDelta:
    """One streamed piece of call `index`: the first carries id and name, later ones argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ExtractedToolCalls:
    content: str | None
    tool_calls: list[ToolCall]


@dataclass
class StreamDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def add_call_delta(self, d: ToolCallDelta) -> None:
        last = self.tool_calls[-1] if self.tool_calls else None
        if last is not None and last.index == d.index and d.id is None:
            last.arguments += d.arguments  # one delta per call per feed
        else:
            self.tool_calls.append(d)


def _arguments_text(raw: str) -> str:
    if raw.startswith('"'):
        try:
            v = json.loads(raw)
        except json.JSONDecodeError:
            return raw
        return v if isinstance(v, str) else raw
    return raw


class _CallTracker:
    """Emits the deltas of one call object that starts at `start` in the growing text."""

    ARG_KEYS = ("arguments", "parameters")

    def __init__(self, index: int, start: int, emit: bool) -> None:
        self.index = index
        self.start = start
        self.emit = emit  # False past the parallel_tool_calls limit: scanned for its extent, never reported
        self.id = new_call_id()
        self.header_sent = False
        self.args_sent_to: int | None = None
        self.args_done = False

    def update(self, s: str, final: bool, out: StreamDelta) -> ObjectScan:
        scan = scan_object(s, self.start, final)
        if not self.emit or scan.error:
            return scan
        name = scan.string_field(s, "name")
        if name is None:
            return scan
        if not self.header_sent:
            out.add_call_delta(ToolCallDelta(self.index, self.id, name, ""))
            self.header_sent = True
        span = next((scan.fields[k] for k in self.ARG_KEYS if k in scan.fields), None)
        if span is not None and not self.args_done:
            a0, a1 = span
            if s[a0] in "{[":  # stream raw text as it grows
                upto = a1 if a1 is not None else len(s)
                frm = self.args_sent_to if self.args_sent_to is not None else a0
                if upto > frm:
                    out.add_call_delta(ToolCallDelta(self.index, arguments=s[frm:upto]))
                    self.args_sent_to = upto
                self.args_done = a1 is not None
            elif a1 is not None:  # a string or scalar: only once complete
                out.add_call_delta(ToolCallDelta(self.index, arguments=_arguments_text(s[a0:a1])))
                self.args_done = True
        elif span is None and scan.end is not None and not self.args_done:
            out.add_call_delta(ToolCallDelta(self.index, arguments="{}"))  # a call without arguments
            self.args_done = True
        return scan


class ToolStreamer(ABC):
    def __init__(self, max_calls: int | None) -> None:
        self.buf = ""
        self.max_calls = max_calls
        self.num_calls = 0  # calls reported so far

    def feed(self, delta: str) -> StreamDelta:
        self.buf += delta
        out = StreamDelta()
        self._advance(False, out)
        return out

    def finish(self) -> StreamDelta:
        out = StreamDelta()
        self._advance(True, out)
        return out

    def _tracker(self, start: int) -> _CallTracker:
        emit = self.max_calls is None or self.num_calls < self.max_calls
        t = _CallTracker(self.num_calls, start, emit)
        if emit:
            self.num_calls += 1
        return t

    @abstractmethod
    def _advance(self, final: bool, out: StreamDelta) -> None: ...


def _partial_suffix(s: str, start: int, tag: str) -> int:
    """Length of the longest suffix of s[start:] that is a proper prefix of `tag` (text to hold back)."""
    for n in range(min(len(tag) - 1, len(s) - start), 0, -1):
        if s.endswith(tag[:n]):
            return n
    return 0


class HermesStreamer(ToolStreamer):
    """Content, then `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen).

    Content is the text before the first call (trailing whitespace dropped when a call follows); text between
    and after calls is dropped. A block that is not a JSON object turns the rest of the output into content.
    """

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, max_calls: int | None) -> None:
        super().__init__(max_calls)
        self.pos = 0
        self.mode = "content"  # content | call_start | call | between | raw
        self.pending_ws = ""
        self.dropped_ws = ""  # whitespace dropped before a tag, restored if the tag starts no call
        self.call: _CallTracker | None = None

    def _content(self, text: str, out: StreamDelta, call_follows: bool) -> None:
        text = self.pending_ws + text
        kept = text.rstrip(WS)
        out.content += kept
        # Trailing whitespace waits: it is content only if more content (or the end) follows, not a call.
        if call_follows:
            self.dropped_ws, self.pending_ws = text[len(kept):], ""
        else:
            self.pending_ws = text[len(kept):]

    def _advance(self, final: bool, out: StreamDelta) -> None:
        s = self.buf
        while True:
            if self.mode in ("content", "between"):
                k = s.find(self.OPEN, self.pos)
                if k >= 0:
                    if self.mode == "content":
                        self._content(s[self.pos:k], out, call_follows=True)
                    self.pos = k + len(self.OPEN)
                    self.mode = "call_start"
                    continue
                hold = 0 if final else _partial_suffix(s, self.pos, self.OPEN)
                if self.mode == "content":
                    self._content(s[self.pos:len(s) - hold], out, call_follows=False)
                    if final:
                        out.content += self.pending_ws
                        self.pending_ws = ""
                self.pos = len(s) - hold
                return
            if self.mode == "call_start":
                j = skip_ws(s, self.pos)
                if j >= len(s):
                    return
                if s[j] != "{":
                    self._to_raw(out)
                    continue
                self.call = self._tracker(j)
                self.mode = "call"
            if self.mode == "call":
                assert self.call is not None
                scan = self.call.update(s, final, out)
                if scan.error and not self.call.header_sent:
                    self._to_raw(out)
                    continue
                if scan.end is None:
                    if final or scan.error:
                        self.pos = len(s)
                    return
                k = s.find(self.CLOSE, scan.end)
                if k < 0:
                    return  # the closing tag is still to come (or never: the call is complete anyway)
                self.pos = k + len(self.CLOSE)
                self.mode = "between"
                continue
            if self.mode == "raw":
                out.content += s[self.pos:]
                self.pos = len(s)
                return

    def _to_raw(self, out: StreamDelta) -> None:
        # Not a tool call after all: the tag and what follows are plain text (pos is just past the tag).
        if self.num_calls == 0:
            out.content += self.dropped_ws
        self.pos -= len(self.OPEN)
        self.mode = "raw"


class ObjectListStreamer(ToolStreamer):
    """Calls as bare JSON objects: Llama 3.1's `{"name": ..., "parameters": {...}}` (optionally after
    `<|python_tag|>`, several separated by `;`), or the forced format of tool_choice=required, a JSON array
    `[{"name": ..., "parameters": {...}}, ...]`. Output that does not start with an object is plain content."""

    TAG = "<|python_tag|>"

    def __init__(self, max_calls: int | None, array: bool) -> None:
        super().__init__(max_calls)
        self.array = array
        self.sep = "," if array else ";"
        self.mode = "start"  # start | calls | content | done
        self.pos = 0
        self.call: _CallTracker | None = None

    def _advance(self, final: bool, out: StreamDelta) -> None:
        s = self.buf
        if self.mode == "start":
            j = skip_ws(s, 0)
            if not self.array and s.startswith(self.TAG, j):
                j = skip_ws(s, j + len(self.TAG))
            elif not self.array and not final and self.TAG.startswith(s[j:]):
                return  # maybe the tag, still arriving
            if j >= len(s):
                if final:
                    out.content += s
                return
            opener = "[" if self.array else "{"
            if s[j] != opener:
                self.mode = "content"
            else:
                self.mode = "calls"
                self.pos = skip_ws(s, j + 1) if self.array else j
        if self.mode == "content":
            out.content += s[self.pos:]
            self.pos = len(s)
            return
        while self.mode == "calls":
            if self.call is None:
                if self.pos >= len(s):
                    return
                if s[self.pos] != "{":
                    self.mode = "done"  # `]`, trailing text or garbage: nothing more to report
                    return
                self.call = self._tracker(self.pos)
            scan = self.call.update(s, final, out)
            if scan.error and self.num_calls <= 1 and not self.call.header_sent:
                self.mode = "content"  # it looked like a call but is not JSON: all of it is plain text
                out.content += s
                self.pos = len(s)
                return
            if scan.error or scan.end is None:
                if scan.error:
                    self.mode = "done"
                return
            j = skip_ws(s, scan.end)
            if j >= len(s):
                return
            if s[j] != self.sep:
                self.mode = "done"
                return
            j = skip_ws(s, j + 1)
            if j >= len(s):
                return
            self.pos = j
            self.call = None


class NamedStreamer(ToolStreamer):
    """tool_choice naming a function: the grammar makes the whole output that function's arguments."""

    def __init__(self, name: str) -> None:
        super().__init__(1)
        self.name = name
        self.id = new_call_id()
        self.started = False
        self.sent = 0

    def _advance(self, final: bool, out: StreamDelta) -> None:
        if not self.started:
            out.add_call_delta(ToolCallDelta(0, self.id, self.name, ""))
            self.started = True
            self.num_calls = 1
        if len(self.buf) > self.sent:
            out.add_call_delta(ToolCallDelta(0, arguments=self.buf[self.sent:]))
            self.sent = len(self.buf)


class ToolParser(ABC):
    name: str

    def __init__(self, max_calls: int | None = None) -> None:
        self.max_calls = max_calls  # 1 when parallel_tool_calls is false

    @abstractmethod
    def streamer(self) -> ToolStreamer: ...

    def extract(self, text: str) -> ExtractedToolCalls:
        """The whole output at once: same state machine, deltas assembled. Calls whose arguments are not valid
        JSON make the whole text plain content (the request then finishes as ordinary text)."""
        s = self.streamer()
        parts = [s.feed(text), s.finish()]
        content = "".join(p.content for p in parts)
        calls: dict[int, ToolCall] = {}
        for p in parts:
            for d in p.tool_calls:
                if d.id is not None:
                    calls[d.index] = ToolCall(d.name or "", "", d.id)
                calls[d.index].arguments += d.arguments
        tool_calls = [calls[i] for i in sorted(calls)]
        for c in tool_calls:
            try:
                json.loads(c.arguments)
            except json.JSONDecodeError:
                return ExtractedToolCalls(text, [])
        return ExtractedToolCalls(content or None, tool_calls)


class HermesToolParser(ToolParser):
    name = "hermes"

    def streamer(self) -> ToolStreamer:
        return HermesStreamer(self.max_calls)


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def streamer(self) -> ToolStreamer:
        return ObjectListStreamer(self.max_calls, array=False)


class JsonArrayToolParser(ToolParser):
    """The output format forced for tool_choice=required."""

    name = "json_array"

    def streamer(self) -> ToolStreamer:
        return ObjectListStreamer(self.max_calls, array=True)


class NamedToolParser(ToolParser):
    name = "named"

    def __init__(self, function_name: str) -> None:
        super().__init__(1)
        self.function_name = function_name

    def streamer(self) -> ToolStreamer:
        return NamedStreamer(self.function_name)


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
}


def get_tool_parser(name: str, max_calls: int | None = None) -> ToolParser:
    try:
        return TOOL_PARSERS[name](max_calls)
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(TOOL_PARSERS)}") from None
