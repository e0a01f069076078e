"""Incremental detokenization and stop strings.

Text is decoded from a short window of recent token ids, so a step costs O(1) however long the output. A
multi-byte character split across tokens decodes to U+FFFD until its last byte arrives: nothing is released
until then. Text that could be the start of a stop string is held back, so a stop string never leaks.
"""

from __future__ import annotations

from functools import lru_cache

from ember.engine.sequence import Sequence
from ember.tokenizer import Tokenizer


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_text = lru_cache(maxsize=65536)(self._token_text)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _decode(self, ids: list[int], seq: Sequence) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=seq.params.skip_special_tokens)

    def append_token(self, seq: Sequence) -> str:
        """Decode what the newest token adds to the text; returns the new text (possibly empty)."""
        st = seq.detok
        ids = seq.token_ids
        prefix = self._decode(ids[st.prefix_offset:st.read_offset], seq)
        full = self._decode(ids[st.prefix_offset:], seq)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            st.prefix_offset, st.read_offset = st.read_offset, len(ids)
            st.output_text += new
            return new
        return ""

    def flush(self, seq: Sequence, end: int | None = None) -> None:
        """At the end, release whatever is still pending up to token `end` (an incomplete character stays
        U+FFFD)."""
        st = seq.detok
        end = len(seq.token_ids) if end is None else end
        if st.read_offset < end:
            prefix = self._decode(seq.token_ids[st.prefix_offset:st.read_offset], seq)
            full = self._decode(seq.token_ids[st.prefix_offset:end], seq)
            st.output_text += full[len(prefix):]
            st.prefix_offset = st.read_offset = end


def find_stop_string(seq: Sequence, new_chars: int) -> tuple[str, int] | None:
    """The first stop string that the last `new_chars` characters completed: (stop, index in the text)."""
    stops = seq.params.stop
    if not stops or new_chars == 0:
        return None
    text = seq.detok.output_text
    longest = max(len(s) for s in stops)
    # A stop may start up to len(stop)-1 characters before the new text.
    start = max(len(text) - new_chars - longest + 1, 0)
    best: tuple[str, int] | None = None
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best is None or i < best[1]):
            best = (s, i)
    return best


def releasable_text(seq: Sequence, finished: bool) -> str:
    """The text not yet handed out, minus a tail that might still become a stop string."""
    st = seq.detok
    end = len(st.output_text)
    if not finished and seq.params.stop:
        end -= _partial_stop_len(st.output_text, seq.params.stop)
    if end <= st.emitted_chars:
        return ""
    out = st.output_text[st.emitted_chars:end]
    st.emitted_chars = end
    return out


def _partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
