"""Sampler arithmetic on synthetic logits."""

from __future__ import annotations

import pytest
import torch

from ember.engine.sequence import Request, Sequence
from ember.sampling.sampler import (
    Sampler,
    SamplingBatch,
    _top_k_top_p_min_p,
    apply_logits_processors,
    argmax_rows,
    argmax_suffices,
)
from ember.sampling_params import SamplingParams

V = 8
EOS = 7


def make_seq(params: SamplingParams, prompt=(1, 2), output=()) -> Sequence:
    req = Request("r", None, list(prompt), params)
    seq = Sequence(0, req, 0)
    seq.token_ids.extend(output)
    return seq


def test_presence_frequency_penalties_follow_openai_definition():
    seq = make_seq(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=(3,), output=(1, 1, 2))
    logits = torch.zeros(1, V)
    apply_logits_processors(logits, [seq], {EOS})
    expected = torch.zeros(V)
    expected[1] = -(0.25 * 2 + 0.5)
    expected[2] = -(0.25 * 1 + 0.5)
    assert torch.equal(logits[0], expected)  # the prompt token 3 is not penalised


def test_repetition_penalty_divides_positive_multiplies_negative():
    seq = make_seq(SamplingParams(repetition_penalty=2.0), prompt=(0,), output=(1,))
    logits = torch.tensor([[4.0, -4.0, 4.0, 0, 0, 0, 0, 0]])
    apply_logits_processors(logits, [seq], {EOS})
    assert logits[0, :3].tolist() == [2.0, -8.0, 4.0]


def test_min_tokens_bans_eos_and_stop_tokens_until_reached():
    seq = make_seq(SamplingParams(min_tokens=2, stop_token_ids=[5]), output=(1,))
    logits = torch.zeros(1, V)
    apply_logits_processors(logits, [seq], {EOS})
    assert logits[0, EOS] == float("-inf") and logits[0, 5] == float("-inf")
    seq.token_ids.append(3)
    logits = torch.zeros(1, V)
    apply_logits_processors(logits, [seq], {EOS})
    assert torch.isfinite(logits).all()


def test_logit_bias_adds():
    seq = make_seq(SamplingParams(logit_bias={3: 2.5, 4: -1.0}))
    logits = torch.zeros(1, V)
    apply_logits_processors(logits, [seq], {EOS})
    assert logits[0, 3] == 2.5 and logits[0, 4] == -1.0


def test_top_k_top_p_min_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05, 0.0, 0.0, 0.0]]) + 1e-12)
    def kept(**kw):
        batch = SamplingBatch.build([make_seq(SamplingParams(temperature=1.0, **kw))], V, torch.device("cpu"))
        return torch.isfinite(_top_k_top_p_min_p(logits.clone(), batch))[0].nonzero().flatten().tolist()
    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.6) == [0, 1]  # 0.5 < 0.6, so the second token is needed
    assert kept(top_p=0.5) == [0]
    assert kept(min_p=0.35) == [0, 1]  # threshold 0.175
    assert kept(top_p=0.01) == [0]  # the top token always survives


def test_seeded_rows_reproducible_and_greedy_rows_exact():
    sampler = Sampler({EOS})
    torch.manual_seed(0)
    logits = torch.randn(3, V)
    def run(order):
        seqs = [make_seq(SamplingParams(temperature=1.0, seed=11)), make_seq(SamplingParams(temperature=0)),
                make_seq(SamplingParams(temperature=1.0))]
        seqs = [seqs[i] for i in order]
        rows = logits[order].clone()
        out = sampler(rows, SamplingBatch.build(seqs, V, torch.device("cpu")))
        return dict(zip(order, out.token_ids, strict=True))
    a, b = run([0, 1, 2]), run([2, 1, 0])
    assert a[0] == b[0]  # seeded: same token whatever the batch order
    assert a[1] == b[1] == int(logits[1].argmax())


def test_sampling_distribution_matches_probabilities():
    sampler = Sampler({EOS})
    probs = torch.tensor([0.6, 0.3, 0.1, 0, 0, 0, 0, 0])
    logits = torch.log(probs + 1e-20).repeat(4000, 1)
    seqs = [make_seq(SamplingParams(temperature=1.0)) for _ in range(4000)]
    out = sampler(logits, SamplingBatch.build(seqs, V, torch.device("cpu")))
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=V).float() / 4000
    assert torch.allclose(freq[:3], probs[:3], atol=0.03)
    assert freq[3:].sum() == 0


def test_logprobs_are_raw_model_logprobs():
    sampler = Sampler({EOS})
    logits = torch.randn(1, V)
    seq = make_seq(SamplingParams(temperature=0, logprobs=2, logit_bias={0: 50.0}))
    raw = logits.log_softmax(-1)
    out = sampler(logits.clone(), SamplingBatch.build([seq], V, torch.device("cpu")))
    assert out.token_ids == [0]  # the bias decides the token ...
    lp, rank, top = out.logprobs[0]
    assert lp == pytest.approx(raw[0, 0].item())  # ... but logprobs describe the model itself
    assert rank == int((raw[0] > raw[0, 0]).sum()) + 1
    assert [t for t, _ in top] == raw[0].topk(2).indices.tolist()


# (1, 50257) and (70, 8192) take the one-pass fallback (an odd vocabulary; 64 rows or more).
@pytest.mark.parametrize("rows,vocab", [(1, 128256), (3, 49152), (2, 32000), (63, 8192), (5, 4096), (1, 50257),
                                       (70, 8192)])
def test_argmax_rows_matches_argmax_with_ties_and_nan(rows, vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(rows, vocab, generator=g)
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    # Ties across and within chunks: the first maximum wins, as in argmax.
    x = torch.randint(0, 3, (rows, vocab), generator=g).float()
    x[0, vocab - 1] = 5.0
    x[0, vocab // 2 + 1] = 5.0
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    assert argmax_rows(x)[0] == vocab // 2 + 1
    x[-1, vocab - 3] = float("nan")
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    x = torch.full((rows, vocab), float("-inf"))
    x[:, 7] = 0.0
    assert argmax_rows(x).tolist() == [7] * rows


def test_wide_vocabulary_sampling_keeps_the_mask_and_the_distribution():
    # 32 rows of a 32000-wide vocabulary take the two-pass argmax; no row is greedy, so no greedy mask is built.
    vocab, rows, rounds = 32000, 32, 100
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(vocab, generator=g) * 0.1
    top = torch.tensor([7, 12345, vocab - 1])
    logits[top] = torch.tensor([4.0, 3.0, 2.0])
    expected = torch.tensor([4.0, 3.0, 2.0]).softmax(0)
    seqs = [make_seq(SamplingParams(temperature=1.0, top_k=3)) for _ in range(rows)]
    batch = SamplingBatch.build(seqs, vocab, torch.device("cpu"))
    assert batch.greedy is None and not batch.all_greedy
    sampler = Sampler({EOS})
    tokens = torch.cat([torch.tensor(sampler(logits.repeat(rows, 1), batch).token_ids) for _ in range(rounds)])
    assert set(tokens.tolist()) <= set(top.tolist())
    freq = torch.stack([(tokens == t).float().mean() for t in top])
    assert torch.allclose(freq, expected, atol=0.03)


@pytest.mark.parametrize(("params", "edits"), [
    (SamplingParams(temperature=0), False),
    (SamplingParams(temperature=0, min_tokens=2), False),  # already has 2 output tokens
    (SamplingParams(temperature=0, logit_bias={3: 5.0}), True),
    (SamplingParams(temperature=0, min_tokens=5), True),
    (SamplingParams(temperature=0, repetition_penalty=1.5), True),
    (SamplingParams(temperature=0, presence_penalty=0.5), True),
    (SamplingParams(temperature=0, frequency_penalty=0.5), True),
])
def test_argmax_suffices_exactly_when_no_processor_edits_the_logits(params, edits):
    """The decode graphs' own argmax stands in for the sampler only when the sampler would take it too."""
    seq = make_seq(params, prompt=(3, 4), output=(1, 2))
    logits = torch.arange(V, dtype=torch.float32).flip(0).unsqueeze(0) / 4
    before = logits.clone()
    apply_logits_processors(logits, [seq], {EOS})
    assert (not torch.equal(logits, before)) == edits
    assert argmax_suffices(SamplingBatch.build([seq], V, torch.device("cpu"))) == (not edits)


def test_argmax_does_not_suffice_for_sampled_rows_logprobs_or_a_grammar():
    greedy = make_seq(SamplingParams(temperature=0))
    for other in (make_seq(SamplingParams(temperature=0.7)), make_seq(SamplingParams(temperature=0, logprobs=1))):
        assert not argmax_suffices(SamplingBatch.build([greedy, other], V, torch.device("cpu")))
    constrained = make_seq(SamplingParams(temperature=0))
    constrained.grammar = object()  # type: ignore[assignment]  # any matcher: a mask edits the logits
    assert not argmax_suffices(SamplingBatch.build([greedy, constrained], V, torch.device("cpu")))
    assert argmax_suffices(SamplingBatch.build([greedy, make_seq(SamplingParams(temperature=0))], V,
                                               torch.device("cpu")))
