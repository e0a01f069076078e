"""Engine logprobs (token id -> Logprob per position) in OpenAI's chat and completions shapes."""

from __future__ import annotations

from ember.outputs import Logprob, PositionLogprobs
from ember.server.protocol import ChatLogprobToken, ChatLogprobTop, CompletionLogprobs, PromptLogprob, PromptLogprobs
from ember.tokenizer import Tokenizer

# JSON has no -inf; vLLM reports impossible tokens as -9999.0 and so do we.
_MIN_LOGPROB = -9999.0


def _clamp(lp: float) -> float:
    return lp if lp > _MIN_LOGPROB else _MIN_LOGPROB


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character byte-level BPE uses for each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class LogprobFormatter:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer.hf, "backend_tokenizer", None), "decoder", None)
        # With byte-level BPE a token's exact bytes are recoverable even when it is half of a UTF-8 character
        # (its decoded text is then U+FFFD); other tokenizers fall back to the UTF-8 of the decoded text.
        self._byte_decoder = _gpt2_byte_decoder() if type(decoder).__name__ == "ByteLevel" else None

    def token_bytes(self, token_id: int, text: str) -> list[int]:
        if self._byte_decoder is not None:
            piece = self.tokenizer.hf.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and all(ch in self._byte_decoder for ch in piece):
                return [self._byte_decoder[ch] for ch in piece]
        return list(text.encode("utf-8"))

    def _text(self, token_id: int, entry: Logprob | None) -> str:
        if entry is not None and entry.decoded_token is not None:
            return entry.decoded_token
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    @staticmethod
    def _top(position: PositionLogprobs, k: int) -> list[tuple[int, Logprob]]:
        """The k most likely tokens at a position, best first (the sampled token only if it is among them)."""
        return sorted(position.items(), key=lambda kv: kv[1].rank)[:k]

    def chat(self, token_ids: list[int], positions: list[PositionLogprobs],
             top_k: int) -> list[ChatLogprobToken]:
        out: list[ChatLogprobToken] = []
        for tok, position in zip(token_ids, positions, strict=False):
            entry = position.get(tok)
            text = self._text(tok, entry)
            top = []
            for tid, lp in self._top(position, top_k):
                alt = self._text(tid, lp)
                top.append(ChatLogprobTop(token=alt, logprob=_clamp(lp.logprob),
                                          bytes=self.token_bytes(tid, alt)))
            out.append(ChatLogprobToken(token=text, logprob=_clamp(entry.logprob) if entry else _MIN_LOGPROB,
                                        bytes=self.token_bytes(tok, text), top_logprobs=top))
        return out

    def prompt(self, token_ids: list[int], positions: list[PositionLogprobs | None] | None,
               top_k: int) -> PromptLogprobs:
        """vLLM's prompt_logprobs: per prompt token, the token itself and the top_k most likely there."""
        out: PromptLogprobs = []
        for i, tok in enumerate(token_ids):
            position = positions[i] if positions is not None and i < len(positions) else None
            if position is None:
                out.append(None)
                continue
            chosen = dict(self._top(position, top_k))
            if tok in position:
                chosen[tok] = position[tok]
            out.append({str(tid): PromptLogprob(logprob=_clamp(lp.logprob), rank=lp.rank,
                                                decoded_token=self._text(tid, lp)) for tid, lp in chosen.items()})
        return out

    def completion(self, token_ids: list[int], positions: list[PositionLogprobs | None], top_k: int,
                   text_offset: int) -> tuple[CompletionLogprobs, int]:
        """Completions shape for consecutive tokens starting at character `text_offset` of the choice's text;
        returns it and the offset after the last token. A None position (the first prompt token, which has no
        context to be scored in) gets null logprobs, as in OpenAI's echo output."""
        result = CompletionLogprobs()
        for tok, position in zip(token_ids, positions, strict=False):
            entry = position.get(tok) if position is not None else None
            text = self._text(tok, entry)
            result.tokens.append(text)
            result.text_offset.append(text_offset)
            text_offset += len(text)
            if position is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(_clamp(entry.logprob) if entry else _MIN_LOGPROB)
            # OpenAI: the top `logprobs` tokens, plus the chosen one when it is not among them.
            top = {self._text(tid, lp): _clamp(lp.logprob) for tid, lp in self._top(position, top_k)}
            if entry is not None:
                top.setdefault(text, _clamp(entry.logprob))
            result.top_logprobs.append(top)
        return result, text_offset
