"""From logits to tokens: logits processors, greedy/random sampling with per-request seeds, and logprobs.

Everything is batched over the rows of one step; per-row parameters arrive as tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.engine.sequence import Sequence
from ember.sampling.grammar import apply_grammar_masks

_NEG_INF = float("-inf")

# (logprob of the chosen token, its rank in the vocabulary, the top-k alternatives as (token, logprob))
LogprobRow = tuple[float, int, list[tuple[int, float]]]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row, when that row asked for logprobs.
    logprobs: list[LogprobRow | None]


@dataclass
class SamplingBatch:
    """The sampling parameters of the rows of one step, as tensors on the logits' device."""

    seqs: list[Sequence]
    temperature: torch.Tensor | None  # [B] (1.0 on greedy rows, so the division is harmless); None if all greedy
    greedy: torch.Tensor | None  # [B] bool; None unless some rows are greedy and some are not
    all_greedy: bool
    top_k: torch.Tensor | None  # [B] int, vocab size where disabled
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    max_logprobs: int  # largest `logprobs` asked for in the batch, -1 when none

    @classmethod
    def build(cls, seqs: list[Sequence], vocab_size: int, device: torch.device) -> SamplingBatch:
        ps = [s.params for s in seqs]
        greedy = [p.greedy for p in ps]
        max_logprobs = max((p.logprobs for p in ps if p.logprobs is not None), default=-1)
        if all(greedy):  # the common latency case: no per-row tensors to build and copy
            return cls(seqs, None, None, True, None, None, None, max_logprobs)
        temp = [1.0 if g else p.temperature for p, g in zip(ps, greedy, strict=True)]

        def col(values: list, dtype: torch.dtype) -> torch.Tensor:
            # non_blocking: a blocking host-to-device copy would wait for the GPU work already queued, which
            # async scheduling keeps busy while this step is prepared.
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        return cls(
            seqs=seqs,
            temperature=col(temp, torch.float32),
            greedy=col(greedy, torch.bool) if any(greedy) else None,
            all_greedy=False,
            top_k=col([p.top_k if p.top_k > 0 else vocab_size for p in ps], torch.long)
            if any(p.top_k > 0 for p in ps) else None,
            top_p=col([p.top_p for p in ps], torch.float32) if any(p.top_p < 1.0 for p in ps) else None,
            min_p=col([p.min_p for p in ps], torch.float32) if any(p.min_p > 0.0 for p in ps) else None,
            max_logprobs=max_logprobs,
        )


def apply_logits_processors(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: set[int]) -> None:
    """In place: logit_bias, min_tokens (no end before it), and repetition/presence/frequency penalties."""
    vocab = logits.shape[1]
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.logit_bias:
            # non_blocking: a blocking copy would wait for the GPU work queued ahead (async scheduling).
            ids = torch.tensor(list(p.logit_bias)).to(logits.device, non_blocking=True)
            bias = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype).to(logits.device, non_blocking=True)
            logits[i, ids] += bias
        if _min_tokens_pending(seq):
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else eos_token_ids)
            banned = {t for t in banned if t < vocab}
            if banned:
                logits[i, list(banned)] = _NEG_INF
        if p.has_penalties:
            _apply_penalties(logits[i], seq, vocab)


def argmax_suffices(batch: SamplingBatch) -> bool:
    """Whether `Sampler.sample` would return the plain argmax of these rows' logits: all greedy, no logprobs,
    and nothing that edits logits first (logit_bias, a pending min_tokens, penalties, a grammar)."""
    if not batch.all_greedy or batch.max_logprobs >= 0:
        return False
    return not any(seq.grammar is not None or seq.params.logit_bias or _min_tokens_pending(seq)
                   or seq.params.has_penalties for seq in batch.seqs)


def _min_tokens_pending(seq: Sequence) -> bool:
    """Whether the sequence may not end yet (min_tokens): its end tokens are banned."""
    return bool(seq.params.min_tokens) and seq.num_output_tokens < seq.params.min_tokens


def _apply_penalties(row: torch.Tensor, seq: Sequence, vocab: int) -> None:
    p = seq.params
    out_ids = torch.tensor(seq.output_token_ids, dtype=torch.long, device=row.device)
    if p.repetition_penalty != 1.0:
        # As in HF/vLLM: every token seen in prompt or output, positive logits divided, negative multiplied.
        seen = torch.zeros(vocab, dtype=torch.bool, device=row.device)
        seen[torch.tensor(seq.token_ids, dtype=torch.long, device=row.device)] = True
        penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        row.copy_(torch.where(seen, penalised, row))
    if (p.presence_penalty or p.frequency_penalty) and out_ids.numel():
        # OpenAI's definition: output tokens only; frequency scales with the count, presence is flat.
        counts = torch.bincount(out_ids, minlength=vocab)[:vocab].to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _top_k_top_p_min_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if batch.top_k is not None or batch.top_p is not None:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if batch.top_k is not None:
            ranks = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
            mask |= ranks >= batch.top_k.unsqueeze(1)
        if batch.top_p is not None:
            probs = sorted_logits.masked_fill(mask, _NEG_INF).softmax(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does.
            before = probs.cumsum(dim=-1) - probs
            mask |= before >= batch.top_p.unsqueeze(1)
        mask[:, 0] = False  # the most likely token always survives
        logits = logits.scatter(1, sorted_idx, sorted_logits.masked_fill(mask, _NEG_INF))
    if batch.min_p is not None:
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * batch.min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < threshold, _NEG_INF)
    return logits


# Below this many rows `argmax_rows` reduces in two passes. torch reduces each row of an argmax in one thread
# block: one row of a 128k vocabulary took 27 µs on an H100, most of a batch-1 step's sampling
# (bench/profile_decode.py, tenth session). From about half the SMs' count of rows, one block a row keeps the GPU
# busy; 256 chunks a row give even one row about two blocks an SM.
_FEW_ROWS = 64
_ARGMAX_CHUNKS = 256


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` of a [B, V] tensor, the same index whatever the ties (the first maximum; a NaN counts as
    the maximum). With few rows of a wide vocabulary: the maximum of each of up to 256 chunks of a row first
    (enough blocks for every SM), then the first chunk holding the row's maximum."""
    b, v = x.shape
    chunks = _ARGMAX_CHUNKS
    while v % chunks:
        chunks //= 2
    if b >= _FEW_ROWS or chunks < 16 or v < 4096:
        return x.argmax(dim=-1)
    width = v // chunks
    values, index = x.reshape(b, chunks, width).max(dim=-1)
    best = values.argmax(dim=-1, keepdim=True)
    return (best * width + index.gather(1, best)).squeeze(1)


def _sample_random(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Exponential race, one sample per row: argmax p / E with E ~ Exp(1) drawn per token, taken in log space
    (argmax logit - log E: the softmax would only add a constant per row, and its one-block row reduction
    cost more than the rest of the sampling at batch 1). A draw of E = 0 (never on CUDA, whose exponential_
    excludes it; ~2^-53 a value from a seeded CPU generator) picks its token, as p / E did."""
    # Every row draws from the device's generator first; seeded rows then overwrite theirs. (Indexing the
    # unseeded rows instead would copy an index list to the device with a blocking copy.)
    noise = torch.empty_like(logits).exponential_()
    for i, s in enumerate(seqs):
        if s.generator is not None:
            # The generator lives on the CPU so a seed gives the same stream on every device.
            row = torch.empty(logits.shape[1]).exponential_(generator=s.generator)
            noise[i].copy_(row, non_blocking=True)
    return argmax_rows(logits - noise.log_())


class Sampler:
    def __init__(self, eos_token_ids: set[int]) -> None:
        self.eos_token_ids = eos_token_ids

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The next token of every row, left on the logits' device (logits are modified in place)."""
        apply_logits_processors(logits, batch.seqs, self.eos_token_ids)
        apply_grammar_masks(logits, [s.grammar for s in batch.seqs])
        if batch.all_greedy:
            return argmax_rows(logits)
        assert batch.temperature is not None
        sampled = _sample_random(_top_k_top_p_min_p(logits / batch.temperature.unsqueeze(1), batch), batch.seqs)
        if batch.greedy is None:
            return sampled
        return torch.where(batch.greedy, argmax_rows(logits), sampled)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [B, V] float32, one row per sampled sequence (modified in place)."""
        raw_logprobs = logits.log_softmax(dim=-1) if batch.max_logprobs >= 0 else None
        tokens = self.sample(logits, batch)
        token_list = tokens.tolist()
        logprobs: list[LogprobRow | None] = [None] * len(token_list)
        if raw_logprobs is not None:
            logprobs = _gather_logprobs(raw_logprobs, tokens, batch)
        return SamplerOutput(token_list, logprobs)


def logprob_rows(raw: torch.Tensor, ids: torch.Tensor, k: int) -> list[LogprobRow]:
    """Per row of log-probabilities: the logprob and rank of `ids[row]`, and the top-k (token, logprob)."""
    chosen = raw.gather(1, ids.unsqueeze(1)).squeeze(1)
    ranks = (raw > chosen.unsqueeze(1)).sum(dim=1) + 1
    top_vals, top_ids = raw.topk(k, dim=-1) if k else (raw[:, :0], ids[:, None][:, :0])
    return [(c, r, list(zip(ti, tv, strict=True))) for c, r, ti, tv in
            zip(chosen.tolist(), ranks.tolist(), top_ids.tolist(), top_vals.tolist(), strict=True)]


def _gather_logprobs(raw: torch.Tensor, tokens: torch.Tensor, batch: SamplingBatch) -> list[LogprobRow | None]:
    rows = logprob_rows(raw, tokens, max(batch.max_logprobs, 0))
    out: list[LogprobRow | None] = []
    for (lp, rank, top), seq in zip(rows, batch.seqs, strict=True):
        n = seq.params.logprobs
        out.append(None if n is None else (lp, rank, top[:n]))
    return out
